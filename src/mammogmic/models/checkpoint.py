"""Checkpoint I/O: the official release's ``.p`` files and our own safetensors format.

Official files are pickled state dicts. They are read with ``torch.load(weights_only=True)``, which refuses
any pickle that would construct something other than tensors and plain containers, so a malicious file runs
nothing. Our own format is a single ``.safetensors`` file whose metadata holds the model config and
provenance (format version, package version, creation date, training config), so a saved model loads with
one call.

Official key map (official -> ours; see docs/architecture.md)::

    ds_net.first_conv.*                      global_net.stem_conv.*
    ds_net.layer_list.{s}.{b}.*              global_net.stages.{s}.{b}.*   (downsample.0 -> downsample)
    ds_net.final_bn.*                        global_net.final_bn.*
    left_postprocess_net.gn_conv_last.*      saliency_head.*
    dn_resnet.*                              local_net.*
    mil_attn_{V,U,w}.*                       attention.{V,U,w}.*
    classifier_linear.*                      local_classifier.*
    fusion_dnn.*                             fusion.*

DMV-CNN files (``{"model": state_dict}``) map through :mod:`mammogmic.models.dmv`; the patch classifier's plain
state dict has our names already (:mod:`mammogmic.models.patch`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mammogmic.errors import CheckpointError
from mammogmic.models.config import BaselineConfig, GMICConfig
from mammogmic.models.dmv import DMVConfig, DMVModel, dmv_state_from_official, ours_to_official_dmv
from mammogmic.models.gmic import GMIC, ResNetBaseline
from mammogmic.models.patch import PatchClassifier, PatchConfig

#: Every model type our files hold, by the ``model_type`` of their metadata.
SavedModel = GMIC | ResNetBaseline | DMVModel | PatchClassifier

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"

# (official pattern, our replacement), applied in order; each key matches at most one rule.
_OFFICIAL_TO_OURS: tuple[tuple[str, str], ...] = (
    (r"^ds_net\.first_conv\.", "global_net.stem_conv."),
    (r"^ds_net\.layer_list\.(\d+)\.(\d+)\.downsample\.0\.", r"global_net.stages.\1.\2.downsample."),
    (r"^ds_net\.layer_list\.", "global_net.stages."),
    (r"^ds_net\.final_bn\.", "global_net.final_bn."),
    (r"^left_postprocess_net\.gn_conv_last\.", "saliency_head."),
    (r"^dn_resnet\.", "local_net."),
    (r"^mil_attn_([VUw])\.", r"attention.\1."),
    (r"^classifier_linear\.", "local_classifier."),
    (r"^fusion_dnn\.", "fusion."),
)
_OURS_TO_OFFICIAL: tuple[tuple[str, str], ...] = (
    (r"^global_net\.stem_conv\.", "ds_net.first_conv."),
    (r"^global_net\.stages\.(\d+)\.(\d+)\.downsample\.", r"ds_net.layer_list.\1.\2.downsample.0."),
    (r"^global_net\.stages\.", "ds_net.layer_list."),
    (r"^global_net\.final_bn\.", "ds_net.final_bn."),
    (r"^saliency_head\.", "left_postprocess_net.gn_conv_last."),
    (r"^local_net\.", "dn_resnet."),
    (r"^attention\.([VUw])\.", r"mil_attn_\1."),
    (r"^local_classifier\.", "classifier_linear."),
    (r"^fusion\.", "fusion_dnn."),
)

#: t of the five released models (``models/sample_model_{1..5}.p``).
RELEASED_PERCENT_T = {1: 0.02, 2: 0.03, 3: 0.03, 4: 0.05, 5: 0.10}


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def official_to_ours(key: str) -> str | None:
    """Our parameter name for an official state-dict key (``None`` if it belongs to no known module)."""
    return _rename(key, _OFFICIAL_TO_OURS)


def ours_to_official(key: str) -> str | None:
    """The official state-dict key for one of our parameter names."""
    return _rename(key, _OURS_TO_OFFICIAL)


def _safe_torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refusing to load: the file is a pickle that contains more than tensors and plain "
            f"containers, so loading it could run code. Only state dicts are accepted. Details: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict (mapping of names to tensors), got {type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:5]))}")
    return dict(obj)


def _check_and_load(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    path: Path,
    official: bool,
    to_official: Callable[[str], str | None] = ours_to_official,
) -> None:
    """Load ``state`` (our names) into ``model`` after checking every key and shape, naming all problems
    (under their official names, by ``to_official``, for official files)."""
    expected = model.state_dict()
    label = (lambda k: to_official(k) or k) if official else (lambda k: k)
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(label(k) for k in expected if k not in state and k not in optional)
    unexpected = sorted(label(k) for k in state if k not in expected)
    mismatched = [
        f"{label(k)}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} missing key(s): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
        )
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}"
        )
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched[:10])}")
    if problems:
        raise CheckpointError(
            f"{path}: checkpoint does not match the model configuration: " + " | ".join(problems)
        )
    full = {**{k: expected[k] for k in optional if k not in state}, **state}
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in full.items()}, strict=True)


def load_official_checkpoint(
    path: str | os.PathLike[str], percent_t: float = 0.02, config: GMICConfig | None = None, **overrides: Any
) -> GMIC:
    """Load an official GMIC release file (``sample_model_N.p``) into :class:`GMIC`, in eval mode, float32.

    Args:
        path: the ``.p`` file (a pickled state dict; read with ``weights_only=True``).
        percent_t: t of that model (released: 0.02, 0.03, 0.03, 0.05, 0.10 for models 1-5).
        config: architecture; defaults to the released GMIC-ResNet-18. ``overrides`` replace its fields.

    Raises:
        CheckpointError: unsafe pickle, unreadable file, or keys/shapes that do not match (all named).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    cfg = (config or GMICConfig()).replace(percent_t=percent_t, **overrides)
    official = _extract_state_dict(_safe_torch_load(path), path)
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in official.items():
        ours = official_to_ours(key)
        if ours is None:
            unknown.append(key)
        else:
            state[ours] = value
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} key(s) that belong to no GMIC module: {', '.join(sorted(unknown)[:10])}"
        )
    model = GMIC(cfg)
    _check_and_load(model, state, path, official=True)
    return model.float().eval()


def load_official_dmv_checkpoint(path: str | os.PathLike[str]) -> DMVModel:
    """Load an official DMV-CNN file (``sample_image_model.p``, ``sample_imageheatmaps_model.p``,
    ``ImageOnly__ModeImage_weights.p``, ...) into :class:`DMVModel`, in eval mode, float32.

    The head (view-wise or image-wise) and the input channels (1, or 3 with heat maps) are read from the file.

    Raises:
        CheckpointError: unsafe pickle, unreadable file, unknown or missing keys, left/right column copies that
            differ, or shapes that do not match (all named).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    state, config = dmv_state_from_official(_extract_state_dict(_safe_torch_load(path), path), str(path))
    model = DMVModel(config)
    _check_and_load(model, state, path, official=True, to_official=ours_to_official_dmv)
    return model.float().eval()


def load_official_patch_classifier(path: str | os.PathLike[str]) -> PatchClassifier:
    """Load the official patch classifier (``sample_patch_model.p``: a DenseNet-121 state dict, with or
    without ``num_batches_tracked``) into :class:`PatchClassifier`, in eval mode, float32.

    Raises:
        CheckpointError: unsafe pickle, unreadable file, keys or shapes that do not match (all named).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    state = _extract_state_dict(_safe_torch_load(path), path)
    model = PatchClassifier()
    _check_and_load(model, state, path, official=False)
    return model.float().eval()


def official_state_dict(model: GMIC) -> dict[str, torch.Tensor]:
    """Our model's weights under the official key names (the reverse of :func:`load_official_checkpoint`)."""
    out = {}
    for key, value in model.state_dict().items():
        name = ours_to_official(key)
        if name is None:  # pragma: no cover - every GMIC parameter has a rule
            raise CheckpointError(f"parameter {key} has no official name")
        out[name] = value.detach().cpu().clone()
    return out


def save_official_checkpoint(model: GMIC, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` as an official-format ``.p`` file (a plain state dict; refuses to overwrite)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; not overwriting")
    _atomic_write(path, lambda tmp: torch.save(official_state_dict(model), tmp))
    return path


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _package_version() -> str:
    from mammogmic import __version__

    return __version__


def save_model(
    model: SavedModel,
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save weights + config + provenance as one ``.safetensors`` file (written atomically).

    Args:
        model: a :class:`GMIC`, :class:`ResNetBaseline`, :class:`DMVModel` or :class:`PatchClassifier`.
        path: destination file (``.safetensors`` recommended).
        metadata: JSON-serialisable extras, e.g. ``{"training_config": {...}, "metrics": {...}}``.
        overwrite: replace an existing file (default: refuse).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if getattr(model, "inference_only", False):
        raise CheckpointError(
            "this model was fused for inference (fuse_for_inference); save the original instead"
        )
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; pass overwrite=True to replace it")
    kind = next(name for name, (cls, _) in _MODEL_TYPES.items() if isinstance(model, cls))
    header = {
        "format": "mammogmic",
        "format_version": FORMAT_VERSION,
        "mammogmic_version": _package_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_type": kind,
        "model_config": json.dumps(model.config.to_dict()),
        "extra": json.dumps(dict(metadata or {}), default=str),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


def read_model_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of a mammogmic ``.safetensors`` file (config, provenance, extras), without the weights."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        hint = " (an official .p file? use load_official_checkpoint)" if path.suffix == ".p" else ""
        raise CheckpointError(f"{path}: not a safetensors model file{hint}: {exc}") from None
    if header.get("format") != "mammogmic":
        raise CheckpointError(f"{path}: safetensors file without mammogmic metadata (no 'format' entry)")
    out: dict[str, Any] = dict(header)
    try:
        out["model_config"] = json.loads(header["model_config"])
        out["extra"] = json.loads(header.get("extra", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt mammogmic metadata: {exc}") from None
    return out


#: ``model_type`` -> (class, config class).
_MODEL_TYPES: dict[str, tuple[Any, Any]] = {
    "gmic": (GMIC, GMICConfig),
    "resnet_baseline": (ResNetBaseline, BaselineConfig),
    "dmv": (DMVModel, DMVConfig),
    "dmv_patch": (PatchClassifier, PatchConfig),
}


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> SavedModel:
    """Load a model saved by :func:`save_model`: builds it from the stored config, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_model_metadata(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    kind = meta.get("model_type")
    if kind not in _MODEL_TYPES:
        raise CheckpointError(
            f"{path}: unknown model_type {kind!r}; expected one of {', '.join(sorted(_MODEL_TYPES))}"
        )
    cls, config_cls = _MODEL_TYPES[kind]
    model = cls(config_cls.from_dict(meta["model_config"]))
    _check_and_load(model, load_file(str(path)), path, official=False)
    return model.to(device).eval()


def official_percent_t(path: str | os.PathLike[str], percent_t: float | None = None) -> float:
    """The t to run an official ``.p`` file with: ``percent_t`` when given, else the released t of
    ``sample_model_N.p`` (:data:`RELEASED_PERCENT_T`). The one rule ``convert``, ``predict`` and ``train --init``
    share.

    Raises:
        CheckpointError: neither given nor a released model's file name.
    """
    if percent_t is not None:
        if not 0.0 < float(percent_t) <= 1.0:
            raise CheckpointError(f"{path}: t must be in (0, 1], got {percent_t}")
        return float(percent_t)
    match = re.fullmatch(r"sample_model_(\d+)", Path(path).stem)
    if match and int(match.group(1)) in RELEASED_PERCENT_T:
        return RELEASED_PERCENT_T[int(match.group(1))]
    raise CheckpointError(
        f"{path}: the t of an official checkpoint is not in the file; pass --percent-t "
        f"(the released models use {', '.join(f'{k}: {v}' for k, v in sorted(RELEASED_PERCENT_T.items()))})"
    )
