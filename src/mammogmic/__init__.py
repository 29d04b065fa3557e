"""mammogmic: GMIC for high-resolution screening mammography.

Public API::

    from mammogmic import GMIC, GMICConfig, load_official_checkpoint, save_model, load_model

The names are imported on first use (module ``__getattr__``), so ``import mammogmic`` does not load torch:
the command line answers ``--help`` and ``--version`` without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mammogmic.models import (
        GMIC,
        BaselineConfig,
        GMICConfig,
        GMICOutput,
        ResNetBaseline,
        load_model,
        load_official_checkpoint,
        save_model,
    )

_LAZY = {
    name: "mammogmic.models"
    for name in (
        "GMIC",
        "BaselineConfig",
        "GMICConfig",
        "GMICOutput",
        "ResNetBaseline",
        "load_model",
        "load_official_checkpoint",
        "save_model",
    )
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'mammogmic' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "GMIC",
    "BaselineConfig",
    "GMICConfig",
    "GMICOutput",
    "ResNetBaseline",
    "__version__",
    "load_model",
    "load_official_checkpoint",
    "save_model",
]
