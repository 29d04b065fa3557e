"""Shared test helpers: location of the official fixtures (fail, not skip, under CI)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = (REPO_ROOT / ".." / "shared" / "fixtures" / "official_gmic").resolve()
DMV_FIXTURES = (REPO_ROOT / ".." / "shared" / "fixtures" / "official_dmv").resolve()


def require_or_skip(message: str) -> None:
    """Something a test needs is missing: fail when ``CI`` is set (it must run there), skip otherwise."""
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set: these tests must run)")
    pytest.skip(message)


def official_fixtures() -> Path:
    """Path of ``shared/fixtures/official_gmic``. Missing: fail when ``CI`` is set, skip otherwise."""
    if not (FIXTURES / "metadata.json").is_file():
        require_or_skip(f"official GMIC fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return official_fixtures()


@pytest.fixture(scope="session")
def sk_metrics():  # type: ignore[no-untyped-def]
    """``sklearn.metrics``, a dev dependency: missing fails when ``CI`` is set, skips (only that test) otherwise."""
    try:
        import sklearn.metrics
    except ImportError as exc:
        require_or_skip(f"scikit-learn is not installed ({exc}); pip install -e '.[dev]'")
    return sklearn.metrics


def official_dmv_fixtures() -> Path:
    """Path of ``shared/fixtures/official_dmv``. Missing: fail when ``CI`` is set, skip otherwise."""
    if not (DMV_FIXTURES / "expected_seed0.json").is_file():
        require_or_skip(f"official DMV-CNN fixtures not found at {DMV_FIXTURES}")
    return DMV_FIXTURES


@pytest.fixture(scope="session")
def dmv_fixtures_dir() -> Path:
    return official_dmv_fixtures()


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of Debian's ``chromium`` (the report's browser tests). Missing: fail when ``CI`` (or
    ``MAMMOGMIC_REQUIRE_CHROMIUM=1``, which ``.ci/run`` sets) is set, skip otherwise."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "chromium not installed (Debian: apt-get install -y chromium)"
        if os.environ.get("MAMMOGMIC_REQUIRE_CHROMIUM") == "1":
            pytest.fail(message + " (MAMMOGMIC_REQUIRE_CHROMIUM=1: it must run here)")
        require_or_skip(message)
    return path
