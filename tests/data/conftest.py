"""Fixtures for the data tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def official_metadata(fixtures_dir: Path) -> dict[str, Any]:
    """``metadata.json`` of the official fixtures (fails under CI when missing, via ``fixtures_dir``)."""
    return json.loads((fixtures_dir / "metadata.json").read_text())
