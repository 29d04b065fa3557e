"""Checkpoint I/O: the official release's ``.p`` files and our own safetensors format.

Official files are pickled state dicts. They are read with ``torch.load(weights_only=True)``, which refuses
any pickle that would construct something other than tensors and plain containers, so a malicious file runs
nothing. Our own format is a single ``.safetensors`` file whose metadata holds the model config and
provenance (format version, package version, creation date, training config), so a saved model loads with
one call.

Model files are untrusted input. Before anything is allocated, a file's tensor names, shapes and dtypes are
read from its header alone (the safetensors JSON header; a memory-mapped zip checkpoint; a structure-only scan
of a legacy pickle) and compared with those of the configured model built on the ``meta`` device, and every
declared byte must lie inside the file. So a small file cannot make us build a large model, and a truncated or
hand-edited one is refused with the offending keys named.

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

import collections
import datetime as _dt
import io
import json
import logging
import math
import os
import pickle
import re
import secrets
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mammogmic.errors import CheckpointError, ConfigError
from mammogmic.models._keys import rename_key
from mammogmic.models.config import BaselineConfig, GMICConfig
from mammogmic.models.dmv import DMVConfig, DMVModel, dmv_state_from_official, ours_to_official_dmv
from mammogmic.models.gmic import GMIC, ResNetBaseline
from mammogmic.models.patch import PatchClassifier, PatchConfig

#: Every model type our files hold, by the ``model_type`` of their metadata.
SavedModel = GMIC | ResNetBaseline | DMVModel | PatchClassifier

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"

#: Largest safetensors header we read (JSON: tensor table + metadata). A GMIC model's is about 40 KB.
MAX_HEADER_BYTES = 4 * 1024**2
#: How many keys each kind of problem lists in an error message.
_MAX_LISTED = 10

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


def official_to_ours(key: str) -> str | None:
    """Our parameter name for an official state-dict key (``None`` if it belongs to no known module)."""
    return rename_key(key, _OFFICIAL_TO_OURS)


def ours_to_official(key: str) -> str | None:
    """The official state-dict key for one of our parameter names."""
    return rename_key(key, _OURS_TO_OFFICIAL)


# -- messages about untrusted files --------------------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")


def _clean(text: object, limit: int = 120) -> str:
    """Text from a file or from torch, safe to print: no escape codes or control characters, cut short."""
    out = "".join(ch if ch.isprintable() else "?" for ch in _ANSI.sub("", str(text)))
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _listed(names: list[str]) -> str:
    more = f" ... (+{len(names) - _MAX_LISTED})" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _unsafe_pickle_error(path: Path, found: str | None) -> CheckpointError:
    what = f" (it references {_clean(found, 80)})" if found else ""
    return CheckpointError(
        f"{path}: refusing to load: the file contains code or Python objects other than tensors and plain "
        f"containers{what}, and mammogmic will not unpickle those. Checkpoints are only ever read as plain "
        "tensors (torch.load with weights_only=True) and there is no option to change that; use a state dict "
        "of tensors or a .safetensors file."
    )


# -- what a configured model expects ---------------------------------------------------------------------------
_Spec = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype) of one tensor


def _expected_specs(model_cls: Callable[[Any], nn.Module], config: Any) -> dict[str, _Spec]:
    """Names, shapes and dtypes of the model's state dict, from a ``meta``-device build: nothing allocated."""
    with torch.device("meta"):
        model = model_cls(config)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _specs_of(state: Mapping[str, torch.Tensor]) -> dict[str, _Spec]:
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def _same_kind(found: torch.dtype, expected: torch.dtype) -> bool:
    """A stored dtype we cast on load: floating for floating (float16/bfloat16/float64 -> float32), integer
    for integer (``num_batches_tracked``). Booleans and complex numbers never fit."""
    if found in (torch.bool, expected) or found.is_complex:
        return found == expected
    return found.is_floating_point == expected.is_floating_point


def check_state_matches(
    path: Path,
    expected: Mapping[str, _Spec],
    found: Mapping[str, _Spec],
    *,
    official: bool = False,
    skip: Collection[str] = (),
    hint: str = "",
    to_official: Callable[[str], str | None] = ours_to_official,
) -> None:
    """Compare a file's tensors with the model's, naming every missing, unexpected and mismatched key.

    Args:
        path: the file (named in the error).
        expected, found: ``name -> (shape, dtype)`` of the model and of the file (our names).
        official: also show the official name of each key (official ``.p`` files), by ``to_official``.
        skip: names to leave out on both sides (tensors re-initialised on purpose).
        hint: appended to the error (what the user can do).

    Raises:
        CheckpointError: listing every problem (up to a bound per kind).
    """

    def label(key: str) -> str:
        name = to_official(key) if official else None
        return _clean(f"{key} ({name})" if name and name != key else key)

    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(label(k) for k in expected if k not in found and k not in optional and k not in skip)
    unexpected = sorted(label(k) for k in found if k not in expected and k not in skip)
    shapes, dtypes = [], []
    for key, (shape, dtype) in found.items():
        if key not in expected or key in skip:
            continue
        want_shape, want_dtype = expected[key]
        if shape != want_shape:
            shapes.append(f"{label(key)}: file {shape} vs model {want_shape}")
        elif not _same_kind(dtype, want_dtype):
            dtypes.append(f"{label(key)}: file {dtype} vs model {want_dtype}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:_MAX_LISTED])}")
    if dtypes:
        problems.append(f"{len(dtypes)} dtype mismatch(es): {'; '.join(dtypes[:_MAX_LISTED])}")
    if problems:
        raise CheckpointError(
            f"{path}: checkpoint does not match the model configuration: " + " | ".join(problems) + hint
        )


def specs_of(state: Mapping[str, torch.Tensor]) -> dict[str, _Spec]:
    """``name -> (shape, dtype)`` of a state dict (what :func:`check_state_matches` compares)."""
    return _specs_of(state)


def _check_and_load(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    path: Path,
    official: bool,
    to_official: Callable[[str], str | None] = ours_to_official,
) -> None:
    """Load ``state`` (our names) into ``model`` after checking every key and shape, naming all problems
    (with their official names, by ``to_official``, for official files)."""
    expected = model.state_dict()
    check_state_matches(
        path, _specs_of(expected), _specs_of(state), official=official, to_official=to_official
    )
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    full = {**{k: expected[k] for k in optional if k not in state}, **state}
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in full.items()}, strict=True)


# -- official .p files -------------------------------------------------------------------------------------------
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since torch 1.6
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch.save's legacy format (the released .p files)
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _safe_torch_load(path: Path, mmap: bool) -> Any:
    """``torch.load(weights_only=True)``; ``mmap`` (zip files only) maps the tensors instead of reading them."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False; we never do. Keep only the offending global's name.
        found = re.search(r"GLOBAL ([\w.]+)", _ANSI.sub("", str(exc)))
        raise _unsafe_pickle_error(path, found.group(1) if found else None) from None
    except (RuntimeError, EOFError, OSError, ValueError, MemoryError) as exc:
        detail = _clean(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 200)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None


class _Corrupt(Exception):
    """A legacy checkpoint's structure is not what torch.save writes."""


class _UnsafeGlobal(Exception):
    """A pickle refers to a global that a state dict never needs."""


@dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class _StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


def _nonneg_ints(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > 8:
        raise _Corrupt(f"{what} is not a tuple of at most 8 integers")
    if not all(type(v) is int and v >= 0 for v in value):
        raise _Corrupt(f"{what} holds something other than non-negative integers")
    return value


def _meta_tensor(storage: object, offset: object, size: object, stride: object, *_: object) -> torch.Tensor:
    """Stands in for ``torch._utils._rebuild_tensor(_v2)``: checks the view fits its storage, allocates nothing."""
    if not isinstance(storage, _StorageRef) or type(offset) is not int or offset < 0:
        raise _Corrupt("a tensor without a valid storage")
    shape = _nonneg_ints(size, "a tensor's size")
    strides = _nonneg_ints(stride, "a tensor's stride")
    if len(shape) != len(strides):
        raise _Corrupt(f"a tensor with size {shape} and stride {strides}")
    if (
        math.prod(shape)
        and offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) >= storage.numel
    ):
        raise _Corrupt(f"a tensor of size {shape} reaches past its storage of {storage.numel} elements")
    return torch.empty(shape, dtype=storage.dtype, device="meta")


class _BoundedFile:
    """Read access for the structure scan that refuses any read past the end of the file, so a pickle that
    declares a huge length fails before anything of that size is allocated."""

    def __init__(self, f: io.BufferedReader, size: int) -> None:
        self._f, self._size = f, size

    def require(self, n: int) -> None:
        """Refuse unless ``n`` more bytes are left in the file."""
        left = self._size - self._f.tell()
        if n > left:
            raise _Corrupt(f"{n} bytes declared past the end of the file ({left} left): truncated or corrupt")

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._f.tell() if n is None or n < 0 else n
        self.require(n)
        return self._f.read(n)

    def readinto(self, buffer: Any) -> int:
        self.require(len(buffer))
        return self._f.readinto(buffer)

    def readline(self) -> bytes:
        return self._f.readline()


class _LegacyScanner(pickle._Unpickler):
    """Reads one pickle of a legacy ``torch.save`` file for its structure only: tensors become ``meta`` tensors
    and storages are recorded, never read. Globals are limited to what a state dict needs, so nothing in the
    file runs; any other global raises :class:`_UnsafeGlobal`."""

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    stack: list[Any]

    def __init__(self, file: _BoundedFile, storages: dict[str, _StorageRef]) -> None:
        super().__init__(file, encoding="utf-8")
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _meta_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise _UnsafeGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _StorageRef:
        # ('storage', storage type, key, location, numel, view metadata), as torch.save's legacy format writes.
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise _Corrupt("an unknown persistent id")
        _, kind, key, location, numel, view = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not isinstance(location, str):
            raise _Corrupt("a malformed storage record")
        if type(numel) is not int or numel < 0 or view is not None:
            raise _Corrupt("a malformed storage record")
        ref = _StorageRef(key, kind.dtype, numel)
        if self.storages.setdefault(key, ref) != ref:
            raise _Corrupt(f"storage {_clean(key, 40)} declared twice, differently")
        return ref

    def _load_build(self) -> None:
        # BUILD sets attributes; a state dict only sets its own ``_metadata``, which we do not need.
        self.stack.pop()
        if type(self.stack[-1]) is not collections.OrderedDict:
            raise _Corrupt("object state set on something other than a state dict")

    dispatch[pickle.BUILD[0]] = _load_build


def _scan_legacy_checkpoint(path: Path) -> Any:
    """The object of a legacy (non-zip) ``torch.save`` file with ``meta`` tensors in place of the data, after
    checking that every storage it declares is present in the file: reads the structure, allocates no tensor."""
    size = path.stat().st_size
    storages: dict[str, _StorageRef] = {}
    try:
        with open(path, "rb") as raw:
            f = _BoundedFile(raw, size)
            if _LegacyScanner(f, storages).load() != _LEGACY_MAGIC:
                raise _Corrupt("no torch.save header")
            if _LegacyScanner(f, storages).load() != _LEGACY_PROTOCOL:
                raise _Corrupt("an unknown legacy protocol version")
            _LegacyScanner(f, storages).load()  # sys_info: byte order and type sizes
            obj = _LegacyScanner(f, storages).load()
            keys = _LegacyScanner(f, storages).load()
            if not isinstance(keys, list) or sorted(keys) != sorted(storages):
                raise _Corrupt("the storage list does not match the storages the tensors use")
            for key in keys:
                ref = storages[key]
                numel = int.from_bytes(f.read(8), "little", signed=True)
                if numel != ref.numel:
                    raise _Corrupt(f"storage {_clean(key, 40)} holds {numel} elements, declared {ref.numel}")
                nbytes = numel * ref.dtype.itemsize
                f.require(nbytes)  # the data must be in the file; skip it without reading
                raw.seek(nbytes, os.SEEK_CUR)
    except _UnsafeGlobal as exc:
        raise _unsafe_pickle_error(path, str(exc)) from None
    except Exception as exc:  # anything a malformed pickle raises means "not a checkpoint"
        detail = (
            _clean(exc, 200) if isinstance(exc, _Corrupt) else f"{type(exc).__name__}: {_clean(exc, 160)}"
        )
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None
    return obj


def _is_zip_checkpoint(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _ZIP_MAGIC


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict (mapping of names to tensors), got {type(obj).__name__}"
        )
    bad = [_clean(k, 80) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {_listed(bad)}")
    return dict(obj)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict (``torch.save``) read as data: its structure and declared sizes are checked against
    the file before any tensor is read (zip: memory-mapped; legacy: scanned), then loaded with
    ``weights_only=True``.

    Raises:
        CheckpointError: unsafe pickle, unreadable or corrupt file.
    """
    try:
        if _is_zip_checkpoint(path):
            return _extract_state_dict(_safe_torch_load(path, mmap=True), path)
        _extract_state_dict(_scan_legacy_checkpoint(path), path)  # sizes bounded by the file before reading
        return _extract_state_dict(_safe_torch_load(path, mmap=False), path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {_clean(exc.strerror or exc)}") from None


def _official_to_our_names(official: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in official.items():
        ours = official_to_ours(key)
        if ours is None:
            unknown.append(_clean(key, 80))
        else:
            state[ours] = value
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} key(s) that belong to no GMIC module: {_listed(sorted(unknown))}"
        )
    return state


def load_official_checkpoint(
    path: str | os.PathLike[str], percent_t: float = 0.02, config: GMICConfig | None = None, **overrides: Any
) -> GMIC:
    """Load an official GMIC release file (``sample_model_N.p``) into :class:`GMIC`, in eval mode, float32.

    The file's keys and shapes are checked before any tensor is read: a zip checkpoint is memory-mapped, a
    legacy one (the released files) is scanned for its structure first.

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
    try:
        zipped = _is_zip_checkpoint(path)
        lazy = _safe_torch_load(path, mmap=True) if zipped else _scan_legacy_checkpoint(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {_clean(exc.strerror or exc)}") from None
    state = _official_to_our_names(_extract_state_dict(lazy, path), path)
    check_state_matches(path, _expected_specs(GMIC, cfg), _specs_of(state), official=True)
    if not zipped:  # the scan gave meta tensors; the sizes are now known to be the model's, so read them
        state = _official_to_our_names(_extract_state_dict(_safe_torch_load(path, mmap=False), path), path)
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
    state, config = dmv_state_from_official(read_state_dict(path), str(path))  # sizes checked before reading
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
    state = read_state_dict(path)  # sizes checked before reading
    model = PatchClassifier()
    _check_and_load(model, state, path, official=False)
    return model.float().eval()


#: Settings that change what a GMIC computes without changing its weights, and that the official code has no
#: option for: a model that sets any of them away from the released value cannot be written as an official file.
_BEHAVIOUR_WITHOUT_OFFICIAL_FORM = (
    "aggregation",
    "patch_selection",
    "patch_alignment",
    "saliency_symmetry",
    "saliency_grid",
    "attention",
    "prediction",
    "fusion_pooling",
    "saliency_head",  # "fusion" also has no saliency head weights to write
)


def official_state_dict(model: GMIC) -> dict[str, torch.Tensor]:
    """Our model's weights under the official key names (the reverse of :func:`load_official_checkpoint`).

    Raises:
        CheckpointError: the architecture has no official equivalent (``global_arch: resnet10``,
            ``global_stride: 16``), or the model runs an option the official code does not have (a non-default
            ``aggregation``, ``patch_selection``, ``patch_alignment``, ``saliency_symmetry``, ``saliency_grid``,
            ``attention``, ``prediction``, ``fusion_pooling`` or ``saliency_head``): a ``.p`` file carries
            weights only, so the official code, or :func:`load_official_checkpoint`, would run those weights
            another way than they were trained.
    """
    cfg = model.config
    released = GMICConfig()
    changed = [
        f"{name}: {getattr(cfg, name)}"
        for name in _BEHAVIOUR_WITHOUT_OFFICIAL_FORM
        if getattr(cfg, name) != getattr(released, name)
    ]
    if changed:
        raise CheckpointError(
            f"{', '.join(changed)} has no official equivalent: an official .p file holds weights only, and the "
            "official code would run them as the released models do; keep this model as .safetensors"
        )
    if cfg.global_arch == "resnet10" or cfg.global_stride is not None:
        what = (
            f"global_arch {cfg.global_arch}"
            if cfg.global_stride is None
            else f"global_stride {cfg.global_stride}"
        )
        raise CheckpointError(
            f"{what} has no official equivalent (the official code builds ResNet-22 or stride-32 ResNet-18 "
            "global networks); keep this model as .safetensors"
        )
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


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write through a temporary file in the destination folder, then rename it into place.

    The file gets the mode ``open(path, "w")`` would give it (0o666 less the umask), like the other outputs:
    not ``mkstemp``'s 0o600, nor the 0o600 that safetensors' ``save_file`` creates files with.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 random names all taken
        raise FileExistsError(f"{path.parent}: cannot create a temporary file")
    try:
        mode = os.stat(tmp).st_mode & 0o777  # what the kernel made of 0o666 and the umask; no os.umask() race
        write(str(tmp))
        os.chmod(tmp, mode)
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

    Raises:
        CheckpointError: a fused model, or metadata so large that :func:`load_model` would refuse the file.
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

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
        if size > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: metadata too large ({size} header bytes, limit {MAX_HEADER_BYTES}); not written"
            )

    _atomic_write(path, write)
    return path


# -- our .safetensors files ---------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _tensor_entry(path: Path, name: str, entry: Any, data_bytes: int) -> tuple[_Spec, int]:
    """Shape, dtype and byte count of one header entry, checked against the bytes the file holds."""
    where = f"{path}: tensor {_clean(name, 80)}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: malformed header entry (corrupt file)")
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(f"{where}: unsupported dtype {_clean(entry['dtype'], 20)}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or len(shape) > 8 or not all(type(n) is int and n >= 0 for n in shape):
        raise CheckpointError(f"{where}: malformed shape {_clean(shape, 60)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
        raise CheckpointError(f"{where}: malformed data_offsets {_clean(offsets, 60)}")
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] do not hold its shape {tuple(shape)} of {entry['dtype']} "
            f"({nbytes} bytes; corrupt file)"
        )
    if end > data_bytes:
        raise CheckpointError(
            f"{where}: declares bytes {begin}..{end} but the file holds only {data_bytes} bytes of tensor data "
            "(truncated or corrupt)"
        )
    return (tuple(shape), dtype), nbytes


def _read_safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, _Spec]]:
    """Metadata and tensor table of a ``.safetensors`` file, from its header alone, with every declared byte
    checked to lie inside the file. Raises :class:`CheckpointError` naming the file (and tensor)."""
    hint = " (an official .p file? use load_official_checkpoint)" if path.suffix == ".p" else ""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: safetensors header of {n} bytes is over the {MAX_HEADER_BYTES}-byte limit; "
                    "refusing it"
                )
            if len(prefix) < 8 or 8 + n > size:
                raise CheckpointError(
                    f"{path}: not a safetensors model file{hint}: its header length does not fit the file "
                    f"({size} bytes)"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {_clean(exc.strerror or exc)}") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not a safetensors model file{hint}: {_clean(exc)}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors model file{hint}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors metadata (not a mapping of strings)")
    data_bytes = size - 8 - n
    specs, total = {}, 0
    for name, entry in header.items():
        specs[name], nbytes = _tensor_entry(path, name, entry, data_bytes)
        total += nbytes
    if total > data_bytes:
        raise CheckpointError(
            f"{path}: the header declares {total} bytes of tensors but the file holds only {data_bytes} "
            "(corrupt file)"
        )
    return metadata, specs


def _decode_metadata(path: Path, header: Mapping[str, str]) -> dict[str, Any]:
    if header.get("format") != "mammogmic":
        raise CheckpointError(f"{path}: safetensors file without mammogmic metadata (no 'format' entry)")
    out: dict[str, Any] = dict(header)
    try:
        out["model_config"] = json.loads(header["model_config"])
        out["extra"] = json.loads(header.get("extra", "{}"))
    except (KeyError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: corrupt mammogmic metadata: {_clean(exc)}") from None
    return out


def read_model_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of a mammogmic ``.safetensors`` file (config, provenance, extras), without the weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    return _decode_metadata(path, _read_safetensors_header(path)[0])


#: ``model_type`` -> (class, config class).
_MODEL_TYPES: dict[str, tuple[Any, Any]] = {
    "gmic": (GMIC, GMICConfig),
    "resnet_baseline": (ResNetBaseline, BaselineConfig),
    "dmv": (DMVModel, DMVConfig),
    "dmv_patch": (PatchClassifier, PatchConfig),
}


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> SavedModel:
    """Load a model saved by :func:`save_model`: builds it from the stored config, in eval mode.

    The stored config is validated and the file's tensor table compared with the model it describes before
    the model is built, so a file whose metadata claims a model larger than its weights is refused cheaply.

    Raises:
        CheckpointError: unreadable or corrupt file, invalid config (the field is named), or tensors that do
            not match the config (missing / unexpected / mismatched keys named).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    header, specs = _read_safetensors_header(path)
    meta = _decode_metadata(path, header)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {_clean(meta.get('format_version'), 20)!r}, expected {FORMAT_VERSION}"
        )
    kind = meta.get("model_type")
    if kind not in _MODEL_TYPES:
        raise CheckpointError(f"{path}: unknown model_type {_clean(kind, 40)!r}")
    model_cls, config_cls = _MODEL_TYPES[kind]
    try:
        config = config_cls.from_dict(meta["model_config"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: invalid model_config in the file's metadata: {exc}") from None
    check_state_matches(path, _expected_specs(model_cls, config), specs)
    model: SavedModel = model_cls(config)  # allocated only now that the file is known to fit it
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as exc:
        raise CheckpointError(f"{path}: cannot read the tensors: {_clean(exc, 200)}") from None
    _check_and_load(model, state, path, official=False)
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
