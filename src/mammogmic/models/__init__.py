"""GMIC model, backbones, patch retrieval and checkpoint I/O; DMV-CNN and its patch classifier."""

from mammogmic.models.checkpoint import (
    RELEASED_PERCENT_T,
    load_model,
    load_official_checkpoint,
    load_official_dmv_checkpoint,
    load_official_patch_classifier,
    official_percent_t,
    official_state_dict,
    read_model_metadata,
    save_model,
    save_official_checkpoint,
)
from mammogmic.models.config import BaselineConfig, GMICConfig
from mammogmic.models.dmv import DMV_LABELS, DMV_VIEWS, DMVConfig, DMVModel, DMVOutput
from mammogmic.models.fuse import (
    cast_for_bf16,
    compile_for_inference,
    fuse_for_inference,
    prepare_for_inference,
    scoring_copy,
)
from mammogmic.models.gmic import GMIC, BaselineOutput, GatedAttention, GMICOutput, ResNetBaseline
from mammogmic.models.patch import PatchClassifier, PatchConfig

__all__ = [
    "DMV_LABELS",
    "DMV_VIEWS",
    "GMIC",
    "RELEASED_PERCENT_T",
    "BaselineConfig",
    "BaselineOutput",
    "DMVConfig",
    "DMVModel",
    "DMVOutput",
    "GMICConfig",
    "GMICOutput",
    "GatedAttention",
    "PatchClassifier",
    "PatchConfig",
    "ResNetBaseline",
    "compile_for_inference",
    "cast_for_bf16",
    "fuse_for_inference",
    "prepare_for_inference",
    "scoring_copy",
    "load_model",
    "load_official_checkpoint",
    "load_official_dmv_checkpoint",
    "load_official_patch_classifier",
    "official_state_dict",
    "official_percent_t",
    "read_model_metadata",
    "save_model",
    "save_official_checkpoint",
]
