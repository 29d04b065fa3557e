"""Strict JSON for the files we write: ``null`` for missing or non-finite numbers, never ``NaN``/``Infinity``.

``json.dumps`` writes ``NaN`` and ``Infinity`` by default, which most JSON readers (browsers, ``jq``, JavaScript,
Go) reject, and its ``default=`` hook is never called for floats, so a NaN AUROC of a one-class split slips
through. :func:`to_json_text` converts first, then serialises with ``allow_nan=False`` so a missed case fails
loudly instead of writing an invalid file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["finite_json", "to_json_text", "write_json"]


def finite_json(obj: Any) -> Any:
    """A copy of ``obj`` made of plain JSON types, with non-finite floats replaced by ``None``.

    Handles nested mappings, lists/tuples, numpy scalars and arrays (through ``.tolist()``/``.item()``) and
    paths (as strings). Other objects are returned unchanged (``json.dumps`` decides about them).
    """
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays, torch tensors
        return finite_json(obj.tolist())
    return obj


def to_json_text(obj: Any, *, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (see :func:`finite_json`), ending with a newline.

    Raises:
        ValueError: a value still not representable in strict JSON.
        TypeError: an object ``json`` cannot serialise.
    """
    import json

    return json.dumps(finite_json(obj), indent=indent, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write strict JSON atomically (temporary file in the same folder, then ``os.replace``)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(to_json_text(obj, indent=indent), encoding="utf-8")
    os.replace(tmp, out)
    return out
