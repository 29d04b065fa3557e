"""GMIC model, backbones, patch retrieval and checkpoint I/O."""

from mammogmic.models.checkpoint import (
    RELEASED_PERCENT_T,
    load_model,
    load_official_checkpoint,
    official_percent_t,
    official_state_dict,
    read_model_metadata,
    save_model,
    save_official_checkpoint,
)
from mammogmic.models.config import BaselineConfig, GMICConfig
from mammogmic.models.fuse import compile_for_inference, fuse_for_inference
from mammogmic.models.gmic import GMIC, BaselineOutput, GatedAttention, GMICOutput, ResNetBaseline

__all__ = [
    "GMIC",
    "RELEASED_PERCENT_T",
    "BaselineConfig",
    "BaselineOutput",
    "GMICConfig",
    "GMICOutput",
    "GatedAttention",
    "ResNetBaseline",
    "compile_for_inference",
    "fuse_for_inference",
    "load_model",
    "load_official_checkpoint",
    "official_state_dict",
    "official_percent_t",
    "read_model_metadata",
    "save_model",
    "save_official_checkpoint",
]
