"""Allocator profiles (mammogmic.runtime), each checked in a fresh interpreter: they change process state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mammogmic.runtime import allocator_in_use, tune_allocator

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


HEAP_PROBE = """
import ctypes, sys
from mammogmic.runtime import keep_freed_heap
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_mib():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) >> 10
kept = keep_freed_heap() if sys.argv[1] == "keep" else None
blocks = [libc.malloc(8 << 20) for _ in range(12)]  # 96 MiB in 8 MiB blocks, each touched
for b in blocks:
    ctypes.memset(b, 1, 8 << 20)
before = rss_mib()
for b in reversed(blocks):
    libc.free(b)
print(kept, before - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_a_kept_heap_keeps_what_is_freed() -> None:
    """glibc as it comes maps 8 MiB blocks of their own and unmaps them when freed; with keep_freed_heap they
    come from the heap and stay, ready for the next pass."""

    def freed_mib(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    kept, returned = freed_mib("keep")
    assert kept == "True" and returned < 8
    kept, returned = freed_mib("plain")
    assert kept == "None" and returned >= 90


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="lean.*fast.*jemalloc.*'quick'"):
        tune_allocator("quick")


def test_cli_picks_fast_for_training_and_lean_otherwise() -> None:
    from mammogmic.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo", "--out", "d"]).allocator_profile == "fast"
    assert parser.parse_args(["train", "c.yaml", "--out", "o"]).allocator_profile == "fast"
    smoke = parser.parse_args(["smoke"])
    assert getattr(smoke, "allocator_profile", "lean") == "lean" and smoke.allocator is None
    assert parser.parse_args(["--allocator", "fast", "smoke"]).allocator == "fast"


def test_float32_inference_runs_jemalloc_where_the_command_can_restart_on_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``default_allocator``: float32 inference commands (``lean`` ones with ``--amp``) run jemalloc when it can
    be had, asked only for them; ``main(argv)`` called from Python never can (it cannot restart)."""
    import mammogmic.cli.main as cli
    import mammogmic.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    asked: list[tuple[str, str | None]] = []

    def choices(available: bool) -> list[str]:
        found = []
        for command in [("lean", "none"), ("lean", "bf16"), ("lean", None), ("fast", "none"), ("fast", None)]:

            def jemalloc(command: tuple[str, str | None] = command) -> bool:
                asked.append(command)
                return available

            found.append(runtime.default_allocator(*command, jemalloc=jemalloc).label)
        return found

    bf16 = "fast, 4 KiB pages, heap kept"
    assert choices(True) == ["jemalloc", bf16, "lean", "fast", "fast"]
    assert choices(False) == ["lean", bf16, "lean", "fast", "fast"]
    assert asked == [("lean", "none")] * 2  # asked only for float32 inference
    monkeypatch.setattr(cli, "jemalloc_available", lambda: True)
    parser = cli.build_parser()
    for command in ("predict", "visualize", "heatmaps"):  # the inference commands, float32 by default
        argv = [command, "DIR", "--model", "m.safetensors", "--out", "o"]
        args = parser.parse_args(argv)
        assert cli.allocator_choice(args, restartable=True).profile == "jemalloc"
        assert cli.allocator_choice(args).profile == "lean"  # main(argv): cannot restart
        assert cli.allocator_choice(parser.parse_args(["--allocator", "fast", *argv]), True).profile == "fast"
    assert cli.allocator_choice(parser.parse_args(["smoke"]), restartable=True).profile == "lean"


def test_bf16_inference_on_the_cpu_runs_the_fast_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``main`` hands to ``tune_allocator`` for a command line, and what it leaves for the model loaders:
    the profile the benchmark's bf16 row runs."""
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
    kept: list[bool] = []
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
            kept.append(cli.allocator_choice(cli.build_parser().parse_args(argv)).keep_heap)
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
    assert kept == [label == bf16 for label in chosen]  # the bf16 profile, and only it, keeps the heap
    assert runtime.AllocatorChoice("fast", False, True).label == "fast, 4 KiB pages, heap kept"


def _smoke(*options: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``mammogmic [options] smoke`` on a tiny input, in a process of its own (started as the console script
    starts it, so that the jemalloc profile can restart it)."""
    import os

    full_env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MAMMOGMIC_JEMALLOC")}
    full_env.update(env)
    command = [sys.executable, "-m", "mammogmic.cli.main", *options, "smoke", "--input-size", "256", "192"]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux-only")
def test_jemalloc_profile_restarts_the_command_on_jemalloc(jemalloc: str) -> None:
    import json

    run = _smoke("--allocator", "jemalloc")
    assert run.returncode == 0, run.stderr
    # "malloc" is read from the process's own memory maps, after the restart
    assert json.loads(run.stdout)["allocator"] == {"profile": "jemalloc", "malloc": "jemalloc"}
    plain = _smoke()
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["allocator"] == {"profile": "lean", "malloc": "glibc"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux-only")
def test_restarted_process_gives_children_the_users_preload(jemalloc: str) -> None:
    import os

    code = (
        "import os; from mammogmic.runtime import allocator_in_use, ensure_jemalloc; "
        "print(repr(ensure_jemalloc()), allocator_in_use(), repr(os.environ.get('LD_PRELOAD')), "
        "sorted(k for k in os.environ if k.startswith('MAMMOGMIC_PRELOAD')))"
    )
    for user in ("libm.so.6", None):  # a harmless preload of the user's own, and none
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MAMMOGMIC_JEMALLOC")}
        if user:
            env["LD_PRELOAD"] = user
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
        )
        assert run.returncode == 0, run.stderr
        problem, malloc, preload, marks = run.stdout.split(maxsplit=3)
        assert (problem, malloc, preload, marks.strip()) == ("''", "jemalloc", repr(user), "[]")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux-only")
def test_restarted_process_runs_jemalloc_with_our_settings_unless_the_users(jemalloc: str) -> None:
    """``MALLOC_CONF`` = ``JEMALLOC_CONF`` in the restarted process (read back from jemalloc itself), gone again
    for its children; a ``MALLOC_CONF`` the user set is what jemalloc runs, and stays."""
    import os

    from mammogmic.runtime import JEMALLOC_CONF

    assert JEMALLOC_CONF == "oversize_threshold:0"
    code = (
        "import ctypes, os; from mammogmic.runtime import ensure_jemalloc; problem = ensure_jemalloc(); "
        "value, size = ctypes.c_size_t(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t)); "
        "rc = ctypes.CDLL(None).mallctl(b'opt.oversize_threshold', ctypes.byref(value), ctypes.byref(size), "
        "None, ctypes.c_size_t(0)); "
        "print(repr(problem), rc, value.value, repr(os.environ.get('MALLOC_CONF')), "
        "sorted(k for k in os.environ if k.startswith('MAMMOGMIC_')))"
    )
    for user, threshold in ((None, "0"), ("oversize_threshold:1048576", "1048576")):
        mine = ("LD_PRELOAD", "MAMMOGMIC_JEMALLOC", "MALLOC_CONF")
        env = {k: v for k, v in os.environ.items() if k not in mine and not k.startswith("MAMMOGMIC_")}
        if user:
            env["MALLOC_CONF"] = user
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["''", "0", threshold, repr(user), "[]"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux-only")
def test_jemalloc_profile_says_what_is_wrong(tmp_path: Path) -> None:
    missing = _smoke("--allocator", "jemalloc", MAMMOGMIC_JEMALLOC=str(tmp_path / "libjemalloc.so.2"))
    assert missing.returncode == 2
    assert f"MAMMOGMIC_JEMALLOC={tmp_path / 'libjemalloc.so.2'}: no such file" in missing.stderr
    # A file the dynamic loader refuses: the restarted process sees no jemalloc and says so, once.
    not_a_library = tmp_path / "notes.txt"
    not_a_library.write_text("not a shared library")
    refused = _smoke("--allocator", "jemalloc", MAMMOGMIC_JEMALLOC=str(not_a_library))
    assert refused.returncode == 2
    assert f"the dynamic loader did not load {not_a_library}" in refused.stderr
    assert refused.stderr.count("error:") == 1 and refused.stdout == ""


def test_jemalloc_profile_cannot_swap_a_running_interpreter(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``main(argv)`` called from Python cannot restart the caller's interpreter: it refuses instead."""
    import os

    from mammogmic.cli.main import main

    if allocator_in_use() == "jemalloc":
        pytest.skip("this test process itself runs on jemalloc")
    monkeypatch.setattr("mammogmic.runtime.jemalloc_library", lambda: "libjemalloc.so.2")
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("main(argv) restarted the interpreter"))
    assert main(["--allocator", "jemalloc", "smoke", "--input-size", "256", "192"]) == 2
    err = capsys.readouterr().err
    assert "must be loaded when the process starts" in err and "LD_PRELOAD=libjemalloc.so.2" in err
