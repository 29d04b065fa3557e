"""Shared fixtures for the synthetic-data tests: one small generated dataset per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mammogmic.data.synth import SynthConfig, generate_dataset

SIZE = (256, 160)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight demo-preset exams at 256x160 with DICOM copies; returns the manifest path."""
    out = tmp_path_factory.mktemp("synth") / "set"
    return generate_dataset(out, 8, SIZE, seed=11, config=SynthConfig.demo(), workers=1, dicom=True)
