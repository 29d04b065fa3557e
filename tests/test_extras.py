"""Optional extras: a missing one fails the feature that needs it, naming the extra and the install line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mammogmic._extras import EXTRA_OF, has_module, require
from mammogmic.data.adapters import _read_table
from mammogmic.errors import MammogmicError, MissingExtraError


def test_require_returns_the_module_when_installed() -> None:
    assert require("onnx", "a test").__name__ == "onnx"


def test_require_names_the_extra_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # type: ignore[arg-type]
    with pytest.raises(MissingExtraError, match=r"mammogmic tune needs optuna, part of the 'train' extra"):
        require("optuna", "mammogmic tune")
    # An environment problem, not bad input: callers that report bad input do not swallow it.
    assert not issubclass(MissingExtraError, MammogmicError) and issubclass(MissingExtraError, ImportError)


def test_require_rejects_modules_of_no_extra() -> None:
    with pytest.raises(KeyError, match="in no extra"):
        require("json", "a test")


def test_every_declared_extra_is_in_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for package, extra in EXTRA_OF.values():
        assert any(req.startswith(package) for req in extras[extra]), f"{package} not in extra {extra!r}"
        assert not any(req.startswith(package) for req in project["dependencies"]), (
            f"{package} is not optional"
        )
    # The test suite's extra pulls every extra whose code the tests run.
    assert "mammogmic[train,xlsx,onnx,dicomweb,htj2k]" in extras["dev"]


def test_has_module() -> None:
    assert has_module("json") and not has_module("no_such_module_mammogmic")


def test_xlsx_sheet_without_openpyxl_names_the_file_and_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # type: ignore[arg-type]
    sheet = tmp_path / "CMMD_clinicaldata_revision.xlsx"
    with pytest.raises(MissingExtraError) as exc:
        _read_table(sheet)
    assert str(sheet) in str(exc.value) and "pip install 'mammogmic[xlsx]'" in str(exc.value)
