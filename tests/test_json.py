"""Strict JSON writer: non-finite numbers become null, never NaN/Infinity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mammogmic._json import finite_json, to_json_text, write_json


def test_non_finite_numbers_become_null_at_any_depth(tmp_path: Path) -> None:
    value = {
        "auroc": float("nan"),
        "nested": [1.5, float("inf"), {"x": -math.inf, "ok": 2}],
        "numpy": np.float32("nan"),
        "array": np.array([0.5, np.nan]),
        "count": np.int64(3),
        "flag": True,
        "path": tmp_path / "a",
        "none": None,
    }
    assert finite_json(value) == {
        "auroc": None,
        "nested": [1.5, None, {"x": None, "ok": 2}],
        "numpy": None,
        "array": [0.5, None],
        "count": 3,
        "flag": True,
        "path": str(tmp_path / "a"),
        "none": None,
    }
    path = write_json(tmp_path / "out" / "r.json", value)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text and text.endswith("\n")
    assert json.loads(text)["auroc"] is None
    assert not list(path.parent.glob(".*tmp"))  # written through a temporary file, renamed


def test_unserialisable_objects_still_fail_loudly() -> None:
    with pytest.raises(TypeError):
        to_json_text({"x": object()})
