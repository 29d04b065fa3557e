"""The command line starts light: parsing argv imports no heavy library, and missing extras are explained.

Timing is measured by ``benchmarks/bench_cli.py``; these tests check the cause (what gets imported), which
does not depend on how loaded the machine is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mammogmic
from mammogmic.cli.main import main

SRC = Path(__file__).resolve().parents[2] / "src"
# Libraries that take from 0.1 s (pandas, numpy) to 2 s (torch) to import; none is needed to parse argv.
HEAVY = ("torch", "numpy", "pandas", "scipy", "matplotlib", "cv2", "PIL", "pydicom", "safetensors", "optuna")


def _imported_modules(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -X importtime -m mammogmic.cli.main ARGS`` and return it with every module it imported."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mammogmic.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    modules = {
        line.split("|")[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return proc, modules


@pytest.mark.parametrize(
    "args",
    [("--help",), ("--version",), ("predict", "--help"), ("train", "--help")],
    ids=lambda a: " ".join(a),
)
def test_parsing_imports_no_heavy_library(args: tuple[str, ...]) -> None:
    # "--help" builds every command's parser (all command modules' add_parser run).
    proc, modules = _imported_modules(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mammogmic.cli.main" in modules or "mammogmic.cli" in modules  # the parse did run in-process
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == [], f"mammogmic {' '.join(args)} imported {heavy[:10]}"


def test_version_prints_the_package_version() -> None:
    proc, _ = _imported_modules("--version")
    assert proc.stdout.strip() == f"mammogmic {mammogmic.__version__}"


def test_package_import_is_lazy_but_complete() -> None:
    code = (
        "import sys, mammogmic\n"
        "assert 'torch' not in sys.modules, 'import mammogmic loaded torch'\n"
        "from mammogmic import GMIC, load_model\n"
        "import mammogmic.models as m\n"
        "assert GMIC is m.GMIC and load_model is m.load_model\n"
        "assert set(mammogmic.__all__) <= set(dir(mammogmic))\n"
        "try:\n"
        "    mammogmic.no_such_name\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no attribute 'no_such_name'" in proc.stdout


def _without(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import MODULE`` fail in this process as if the package were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # type: ignore[arg-type]


def test_train_without_train_extra_says_which_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _without(monkeypatch, "tensorboard")
    assert main(["train", "tiny_cpu", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "mammogmic train" in err and "pip install 'mammogmic[train]'" in err
    assert not (tmp_path / "run").exists()


def test_tune_without_optuna_says_which_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _without(monkeypatch, "optuna")
    monkeypatch.delitem(sys.modules, "mammogmic.training.tune", raising=False)  # re-run its guarded import
    assert main(["tune", "tiny_cpu", "--out", str(tmp_path / "search")]) == 2
    err = capsys.readouterr().err
    assert "optuna" in err and "pip install 'mammogmic[train]'" in err
