"""Fixtures for the training tests."""

from __future__ import annotations

import pytest
from training_helpers import BlobImages, tiny_config

from mammogmic.training.config import TrainConfig


@pytest.fixture
def blob_images() -> BlobImages:
    return BlobImages()


@pytest.fixture
def tiny() -> TrainConfig:
    return tiny_config()
