"""mammogmic: GMIC for high-resolution screening mammography.

Public API::

    from mammogmic import GMIC, GMICConfig, load_official_checkpoint, save_model, load_model
"""

__version__ = "0.1.0"

from mammogmic.models import (
    GMIC,
    BaselineConfig,
    GMICConfig,
    GMICOutput,
    ResNetBaseline,
    load_model,
    load_official_checkpoint,
    save_model,
)

__all__ = [
    "GMIC",
    "BaselineConfig",
    "GMICConfig",
    "GMICOutput",
    "ResNetBaseline",
    "__version__",
    "load_model",
    "load_official_checkpoint",
    "save_model",
]
