"""Allocator profiles (mammogmic.runtime), each checked in a fresh interpreter: they change process state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mammogmic.runtime import tune_allocator

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

PROBE = """
import os, sys, torch
from mammogmic.runtime import tune_allocator
fixed = tune_allocator(sys.argv[1])
x = torch.ones(16 << 20)  # 64 MiB, allocated after the profile is applied
x += 1
huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")][0].split()[1]
print(fixed, os.environ.get("THP_MEM_ALLOC_ENABLE"), int(huge) > 0)
"""


def _probe(profile: str, env_thp: str | None = None) -> list[str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_thp is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_thp
    out = subprocess.run(
        [sys.executable, "-c", PROBE, profile], capture_output=True, text=True, env=env, check=True
    )
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux-only")
def test_profiles_set_huge_pages_and_mmap_threshold() -> None:
    thp_usable = THP.exists() and "[never]" not in THP.read_text()
    fixed, env, huge = _probe("lean")
    assert (fixed, env) == ("True", "1")
    if thp_usable:
        assert huge == "True"  # PyTorch backed the 64 MiB tensor with huge pages
    fixed, env, huge = _probe("fast")
    assert (fixed, env) == ("False", "1")
    # A user's explicit choice wins.
    fixed, env, huge = _probe("lean", env_thp="0")
    assert (env, huge) == ("0", "False")


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="lean.*fast.*'quick'"):
        tune_allocator("quick")


def test_cli_picks_fast_for_training_and_lean_otherwise() -> None:
    from mammogmic.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo", "--out", "d"]).allocator_profile == "fast"
    assert parser.parse_args(["train", "c.yaml", "--out", "o"]).allocator_profile == "fast"
    smoke = parser.parse_args(["smoke"])
    assert getattr(smoke, "allocator_profile", "lean") == "lean" and smoke.allocator is None
    assert parser.parse_args(["--allocator", "fast", "smoke"]).allocator == "fast"


def test_bf16_inference_on_the_cpu_runs_the_fast_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``main`` hands to ``tune_allocator`` for a command line: the profile the benchmark's bf16 row runs."""
    import mammogmic.cli.main as cli
    import mammogmic.runtime as runtime

    chosen: list[str] = []

    class Stop(Exception):
        pass

    def record(profile: str, huge_pages: bool = True) -> bool:
        chosen.append(profile if huge_pages else f"{profile}, 4 KiB pages")
        raise Stop

    monkeypatch.setattr(cli, "tune_allocator", record)
    predict = ["predict", "--manifest", "a.csv", "--model", "m.safetensors", "--out", "o"]
    for fast_cpu in (False, True):
        monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda fast=fast_cpu: fast)
        for argv in (
            predict,
            [*predict, "--amp", "bf16"],
            [*predict, "--amp", "auto"],
            ["--allocator", "lean", *predict, "--amp", "bf16"],
            ["smoke"],
        ):
            with pytest.raises(Stop):
                cli.main(argv)
    bf16 = "fast, 4 KiB pages"
    assert chosen == [
        "lean",
        bf16,
        "lean",
        "lean",
        "lean",  # a CPU without native bf16: auto is float32
        "lean",
        bf16,
        bf16,
        "lean",
        "lean",  # with it: auto is bf16
    ]
