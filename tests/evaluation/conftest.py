"""Shared helpers for the evaluation tests: a tiny GMIC checkpoint and synthetic mammograms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY = {"global_width": 4, "local_width": 8, "crop_size": (32, 32), "num_patches": 2}
SIZE_ARGS = ["--input-size", "256", "192", "--crop-iterations", "3", "--workers", "0", "--no-progress"]


def write_breast_png(path: Path, side: str, seed: int, shape: tuple[int, int] = (320, 240)) -> np.ndarray:
    """A 16-bit PNG with a bright half-ellipse on the chest-wall side (left edge for L views, right for R)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w]
    dist_col = cols if side == "L" else (w - 1 - cols)
    inside = ((rows - h / 2) / (0.42 * h)) ** 2 + (dist_col / (0.7 * w)) ** 2 <= 1
    img = np.where(inside, 20000 + rng.integers(0, 20000, size=shape), 0).astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return img


@pytest.fixture(scope="session")
def size_args() -> list[str]:
    """CLI flags for tiny inputs: 256x192 model input, light breast-crop morphology, no workers."""
    return list(SIZE_ARGS)


@pytest.fixture(scope="session")
def breast_png():  # type: ignore[no-untyped-def]
    """The :func:`write_breast_png` helper."""
    return write_breast_png


def _tiny(tmp_path_factory: pytest.TempPathFactory, seed: int, name: str) -> Path:
    torch = pytest.importorskip("torch")
    from mammogmic import GMIC, GMICConfig, save_model

    torch.manual_seed(seed)
    path = tmp_path_factory.mktemp("model") / name
    save_model(GMIC(GMICConfig(**TINY)), path, metadata={"note": "test"})
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GMIC with random weights (seed 0)."""
    return _tiny(tmp_path_factory, 0, "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny GMIC (seed 1): an ensemble member whose scores differ from :func:`tiny_model`'s."""
    return _tiny(tmp_path_factory, 1, "tiny_b.safetensors")
