"""Training checkpoints: one versioned dict, written atomically, loaded with ``weights_only=True``.

Schema (``CHECKPOINT_VERSION`` 1)::

    {"format": "mammogmic-train", "version": 1,
     "config": TrainConfig.to_dict(),            # resolved config (model architecture included)
     "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ... | None,
     "state": {"epoch", "batches_done", "global_step", "best_metric", "best_epoch", "bad_epochs", ...},
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor...], "numpy": {...}, "python": [...]}}

Only tensors, numbers, strings, lists, tuples and dicts are stored, so the file loads with
``torch.load(weights_only=True)``: a checkpoint from someone else is data, never code. Writes go to a temporary
file in the same folder, are flushed to disk and then renamed over the target with :func:`os.replace`, so a
crash leaves either the old or the new file, never a truncated one.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mammogmic.errors import CheckpointError

__all__ = [
    "CHECKPOINT_VERSION",
    "atomic_torch_save",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
_FORMAT = "mammogmic-train"


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (temporary file in the same folder + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU/CUDA, numpy, python) in a ``weights_only``-loadable form."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())  # noqa: NPY002 - saving the global state is the point
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | Path,
    *,
    config: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    state: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write a training checkpoint atomically (see the module docstring for the schema).

    Args:
        path: destination (``.pt``).
        config: resolved config dict (``TrainConfig.to_dict()``).
        model: the model (a DDP wrapper is unwrapped).
        optimizer, scheduler, scaler: their ``state_dict()`` is stored when given.
        state: loop counters (epoch, batches_done, global_step, best metric, sampler position...).
        rng: RNG states (default: :func:`capture_rng_state` now).
    """
    inner = getattr(model, "module", None)
    net = inner if isinstance(inner, torch.nn.Module) else model  # unwrap DistributedDataParallel
    payload = {
        "format": _FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": config,
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "state": dict(state or {}),
        "rng": rng if rng is not None else capture_rng_state(),
    }
    return atomic_torch_save(payload, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a training checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        CheckpointError: missing file, unreadable/unsafe content, or not a mammogmic training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt zip, pickle with code objects, ...
        raise CheckpointError(f"{path}: cannot load as a safe (weights-only) checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a mammogmic training checkpoint (missing format={_FORMAT!r})")
    version = payload.get("version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {version!r} unsupported (expected {CHECKPOINT_VERSION})"
        )
    for key in ("config", "model", "state"):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    return payload
