"""ONNX export for deployment runtimes (onnxruntime, TensorRT, OpenVINO...), checked against onnxruntime.

The whole GMIC forward pass is one graph, patch retrieval included. The greedy top-K window search
(:func:`mammogmic.models.roi.greedy_windows`) is a fixed number of steps of average pooling, ``ArgMax`` and
masking, and the crop is one ``GatherElements``: ``torch.onnx.export`` (the ``torch.export``-based exporter)
traces all of it, so a runtime needs nothing but the ``.onnx`` file. The grid-to-pixel mapping stays in
float64 as in the model, and the exported patch locations equal PyTorch's.

Graph contract::

    input   x                (N, C, H, W) float32, N dynamic, (H, W) fixed: the model's input contract
    outputs prediction       (N, 2)  the head the model predicts with (GMICConfig.prediction)
            y_fusion, y_global, y_local   (N, 2) probabilities, columns [benign, malignant]
            saliency         (N, 2, h, w)
            patch_locations  (N, K, 2) int64, upper-left (row, col) in input pixels
            patch_attention  (N, K)
    (the ResNet baseline: ``prediction`` only)

The file's metadata (``metadata_props``) holds ``mammogmic_version``, ``model_type``, ``model_config``,
``input_shape`` and whatever the caller adds (``mammogmic export`` adds the input contract and the source
model's path and SHA-256), all as JSON text. ``onnx``, ``onnxscript`` (export) and ``onnxruntime`` (the
check, :class:`OnnxSession`) come from the ``onnx`` extra.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mammogmic import __version__
from mammogmic._extras import require
from mammogmic.errors import MammogmicError
from mammogmic.models.checkpoint import _atomic_write
from mammogmic.models.gmic import GMIC, ResNetBaseline

__all__ = [
    "BASELINE_OUTPUTS",
    "GMIC_OUTPUTS",
    "PROBABILITY_OUTPUTS",
    "OnnxCheck",
    "OnnxExport",
    "OnnxParityError",
    "OnnxSession",
    "check_onnx",
    "export_onnx",
    "torch_outputs",
]

GMIC_OUTPUTS = (
    "prediction",
    "y_fusion",
    "y_global",
    "y_local",
    "saliency",
    "patch_locations",
    "patch_attention",
)
BASELINE_OUTPUTS = ("prediction",)
# Outputs compared with a tolerance by the check (the rest: patch_locations, exactly).
PROBABILITY_OUTPUTS = ("prediction", "y_fusion", "y_global", "y_local", "saliency", "patch_attention")
DEFAULT_OPSET = 18
_PURPOSE = "ONNX export"


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter for one export: per-pass INFO lines (hundreds), warnings about the
    torchvision operators GMIC does not use, and torch-internal deprecation warnings."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class OnnxParityError(MammogmicError):
    """The exported graph's outputs differ from the PyTorch model's beyond the tolerance."""


class _GMICGraph(nn.Module):
    """GMIC with a tuple of tensors as output (an exporter cannot return a dataclass)."""

    def __init__(self, model: GMIC) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(x)
        return tuple(getattr(out, name) for name in GMIC_OUTPUTS)


class _BaselineGraph(nn.Module):
    def __init__(self, model: ResNetBaseline) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.model(x).prediction,)


def _graph(model: GMIC | ResNetBaseline) -> tuple[nn.Module, tuple[str, ...]]:
    if isinstance(model, GMIC):
        if model.config.patch_selection != "saliency":
            raise MammogmicError(
                f"ONNX export supports saliency-guided patch selection only; this model has "
                f"patch_selection={model.config.patch_selection!r}"
            )
        return _GMICGraph(model).eval(), GMIC_OUTPUTS
    if isinstance(model, ResNetBaseline):
        return _BaselineGraph(model).eval(), BASELINE_OUTPUTS
    raise TypeError(f"expected a GMIC or ResNetBaseline model, got {type(model).__name__}")


def torch_outputs(model: GMIC | ResNetBaseline, x: np.ndarray) -> dict[str, np.ndarray]:
    """The PyTorch model's graph outputs for a batch ``x`` ``(N, C, H, W)`` float32, by name."""
    graph, names = _graph(model)
    with torch.inference_mode():
        values = graph(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return {name: v.cpu().numpy() for name, v in zip(names, values, strict=True)}


class OnnxSession:
    """An onnxruntime CPU session on an exported file.

    Example:
        >>> session = OnnxSession("gmic.onnx")
        >>> out = session(x)            # x: (N, 1, H, W) float32, H x W = session.input_shape
        >>> out["y_fusion"][:, 1]       # malignant probability

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (``None``: onnxruntime's default, one per core).
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        ort = require("onnxruntime", "running an ONNX model")
        self.path = Path(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are about graph optimisations it skipped
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own types for missing/invalid files
            raise MammogmicError(f"{self.path}: not a loadable ONNX model ({exc})") from None
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def input_shape(self) -> tuple[int, int]:
        """The fixed ``(H, W)`` the graph was exported for."""
        shape = self.session.get_inputs()[0].shape
        return int(shape[2]), int(shape[3])

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch ``x`` ``(N, C, H, W)`` float32; every output by name."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[2:]) != self.input_shape:
            raise ValueError(
                f"{self.path}: expected input (N, C, {self.input_shape[0]}, {self.input_shape[1]}), "
                f"got {tuple(x.shape)}"
            )
        values = self.session.run(None, {self.session.get_inputs()[0].name: x})
        return dict(zip(self.output_names, values, strict=True))


@dataclass
class OnnxCheck:
    """Exported graph vs PyTorch on some inputs: the largest absolute difference of each output."""

    max_abs: dict[str, float] = field(default_factory=dict)
    same_locations: bool = True
    n_images: int = 0
    atol: float = 1e-4

    @property
    def ok(self) -> bool:
        return self.same_locations and all(v <= self.atol for v in self.max_abs.values())

    def describe(self) -> str:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in self.max_abs.items())
        locations = "same" if self.same_locations else "DIFFERENT"
        return f"{self.n_images} image(s): max |difference| {diffs}; patch locations {locations}"


def check_onnx(
    model: GMIC | ResNetBaseline, session: OnnxSession, inputs: Sequence[np.ndarray], atol: float = 1e-4
) -> OnnxCheck:
    """Compare ``session`` with ``model`` on each input ``(N, C, H, W)`` (one batch each).

    Probabilities, saliency and attention must agree within ``atol``, patch locations exactly.
    """
    check = OnnxCheck(atol=atol)
    for x in inputs:
        ref = torch_outputs(model, x)
        got = session(x)
        check.n_images += int(x.shape[0])
        for name, value in ref.items():
            if name == "patch_locations":
                check.same_locations &= bool(np.array_equal(value, got[name]))
            else:
                diff = float(np.abs(value.astype(np.float64) - got[name]).max())
                check.max_abs[name] = max(check.max_abs.get(name, 0.0), diff)
    return check


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: Path
    input_shape: tuple[int, int]
    outputs: tuple[str, ...]
    opset: int
    seconds: float
    check: OnnxCheck | None = None


def export_onnx(
    model: GMIC | ResNetBaseline,
    path: str | os.PathLike[str],
    input_hw: tuple[int, int],
    *,
    check_inputs: Sequence[np.ndarray] = (),
    atol: float = 1e-4,
    metadata: Mapping[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
) -> OnnxExport:
    """Export ``model`` (as it is: pass :func:`mammogmic.models.fuse_for_inference`'s copy for speed) to one
    self-contained ONNX file with a dynamic batch and a fixed ``input_hw``.

    With ``check_inputs`` the graph is run by onnxruntime on each batch and compared with ``model``
    (:func:`check_onnx`) before the file appears at ``path``; a mismatch leaves no file.

    Args:
        model: a GMIC (saliency-guided patch selection) or ResNet baseline, on the CPU.
        path: destination; never overwritten.
        input_hw: the fixed input ``(height, width)``, the model's input contract.
        check_inputs: batches ``(N, C, H, W)`` float32 to check the export on.
        atol: tolerance of the check.
        metadata: extra JSON-serialisable entries for the file's ``metadata_props``.
        opset: ONNX opset.

    Raises:
        FileExistsError: ``path`` exists.
        MissingExtraError: the ``onnx`` extra is not installed.
        OnnxParityError: the check failed (the message gives every difference).
        MammogmicError: a model the export does not support.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; not overwriting")
    onnx = require("onnx", _PURPOSE)
    require("onnxscript", _PURPOSE)  # torch.onnx's exporter translates with it
    graph, names = _graph(model)
    channels = model.config.in_channels
    start = time.perf_counter()
    example = torch.zeros(2, channels, *input_hw)  # batch 2: a batch of 1 would be specialised to 1
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter():
        program = torch.onnx.export(
            graph,
            (example,),
            input_names=["x"],
            output_names=list(names),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={"x": {0: batch}},
            external_data=False,
            verbose=False,
        )
    if program is None:  # pragma: no cover - only the TorchScript exporter returns None
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    entries = {
        "mammogmic_version": __version__,
        "model_type": "gmic" if isinstance(model, GMIC) else "resnet_baseline",
        "model_config": model.config.to_dict(),
        "input_shape": list(input_hw),
        "outputs": list(names),
        **dict(metadata or {}),
    }
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value if isinstance(value, str) else json.dumps(value, default=str)
    seconds = time.perf_counter() - start
    check: OnnxCheck | None = None

    def write_and_check(tmp: str) -> None:
        nonlocal check
        onnx.save_model(proto, tmp)
        if check_inputs:
            check = check_onnx(model, OnnxSession(tmp), check_inputs, atol=atol)
            if not check.ok:
                raise OnnxParityError(
                    f"{path}: the exported graph does not reproduce the model (tolerance {atol:g}): "
                    f"{check.describe()}; nothing written"
                )

    _atomic_write(path, write_and_check)  # a failed check leaves no file behind
    return OnnxExport(path, (int(input_hw[0]), int(input_hw[1])), names, opset, seconds, check)
