"""Model commands: ``smoke`` (one forward pass on a synthetic input), ``convert`` (checkpoint formats) and
``export`` (ONNX for deployment runtimes)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mammogmic.cli import allocator_record, deprecated_alias

if TYPE_CHECKING:
    import numpy as np

    from mammogmic.data.sample import InputContract
    from mammogmic.models import GMIC, ResNetBaseline


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "smoke",
        help="run GMIC once on a synthetic input and print its outputs (no data or weights needed)",
        description="Build a GMIC model (random weights, or --model) and run one forward pass on a "
        "synthetic image; print predictions, patch locations and timings as JSON.",
    )
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="model input size (default 2944 1920)",
    )
    p.add_argument("--model", type=Path, help="a mammogmic .safetensors model or an official .p file")
    p.add_argument(
        "--percent-t",
        type=float,
        default=None,
        help="t for an official .p file (default: the released t of sample_model_N.p, else required)",
    )
    p.add_argument("--seed", type=int, default=0)
    deprecated_alias(p, "--weights", "--model")
    for old in ("--height", "--width"):  # one number each; --input-size takes both
        one: dict[str, Any] = {"type": int, "nargs": None, "metavar": None, "default": None}
        deprecated_alias(p, old, "--input-size", note="it takes both: H W", dest=old[2:], **one)
    p.set_defaults(func=run_smoke)

    c = sub.add_parser(
        "convert",
        help="convert an official GMIC .p checkpoint to a mammogmic .safetensors model, or back",
        description="Official .p -> .safetensors (with config and provenance), or .safetensors -> official .p "
        "with --to-official. Never overwrites an existing file.",
    )
    c.add_argument("source", type=Path)
    c.add_argument("dest", type=Path)
    c.add_argument(
        "--percent-t",
        type=float,
        default=None,
        help="t of an official .p source (default: the released t of sample_model_N.p: 1: 0.02, 2-3: 0.03, "
        "4: 0.05, 5: 0.10; required for other names); refused for .safetensors sources, whose t is in their config",
    )
    c.add_argument("--to-official", action="store_true", help="write the official .p format instead")
    c.set_defaults(func=run_convert)

    e = sub.add_parser(
        "export",
        help="export a model to ONNX (patch retrieval inside the graph), checked against onnxruntime",
        description="Export the inference model (BatchNorms folded) to one ONNX file: dynamic batch, the input "
        "size of the model's input contract, the whole GMIC forward pass with the patch retrieval in the "
        "graph. Before the file is written, onnxruntime runs it and its outputs are compared with PyTorch's "
        "(probabilities within --atol, patch locations equal) on --check-image files, prepared as predict "
        "prepares them, or on one synthetic input. Needs the onnx extra: pip install 'mammogmic[onnx]'. "
        "Never overwrites. Exit 0: written; 1: the check failed (nothing written); 2: bad input or a "
        "missing extra. See docs/deployment.md.",
    )
    e.add_argument("model", type=Path, help="a mammogmic .safetensors model or an official .p file")
    e.add_argument("--onnx", type=Path, required=True, metavar="OUT.onnx", help="the ONNX file to write")
    e.add_argument(
        "--percent-t",
        type=float,
        default=None,
        help="t for an official .p file (default: the released t of sample_model_N.p, else required)",
    )
    e.add_argument(
        "--check-image",
        type=Path,
        action="append",
        default=[],
        metavar="IMAGE",
        help="an image (PNG/DICOM) to check the export on, one batch each (repeatable; default: one "
        "synthetic input)",
    )
    e.add_argument("--atol", type=float, default=1e-4, help="check tolerance on probabilities (default 1e-4)")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    e.add_argument("--no-check", action="store_true", help="write without running onnxruntime")
    e.set_defaults(func=run_export)


def _load(path: Path, percent_t: float | None) -> GMIC | ResNetBaseline:
    from mammogmic.errors import CheckpointError
    from mammogmic.models import (
        GMIC,
        ResNetBaseline,
        load_model,
        load_official_checkpoint,
        official_percent_t,
    )

    if path.suffix == ".p":
        return load_official_checkpoint(path, percent_t=official_percent_t(path, percent_t))
    if percent_t is not None:
        raise CheckpointError(
            f"{path}: --percent-t applies to official .p files; this model's t is in its config"
        )
    model = load_model(path)
    if not isinstance(model, (GMIC, ResNetBaseline)):
        raise CheckpointError(f"{path}: a {type(model).__name__} model; this command takes GMIC models")
    return model


def run_smoke(args: argparse.Namespace) -> int:
    import torch

    from mammogmic import GMIC
    from mammogmic.errors import MammogmicError

    torch.manual_seed(args.seed)
    height, width = args.input_size or (2944, 1920)
    height, width = args.height or height, args.width or width  # the deprecated --height/--width
    try:
        model = _load(args.model, args.percent_t) if args.model else GMIC().eval()
    except MammogmicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not isinstance(model, GMIC):
        print("error: smoke needs a GMIC model", file=sys.stderr)
        return 2
    # A smooth synthetic "breast" on a zero background, standardised like a real input.
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(0, 1, width), indexing="ij")
    img = ((xx**2 + yy**2) < 0.8).float() * (1 + 0.1 * torch.randn(height, width))
    x = ((img - img.mean()) / img.std().clamp_min(1e-5))[None, None]
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(x)
    seconds = time.perf_counter() - start
    report = {
        "input_shape": list(x.shape),
        "saliency_shape": list(out.saliency.shape),
        "y_fusion": out.y_fusion[0].tolist(),
        "y_global": out.y_global[0].tolist(),
        "y_local": out.y_local[0].tolist(),
        "patch_locations": out.patch_locations[0].tolist(),
        "patch_attention": out.patch_attention[0].tolist(),
        "forward_seconds": round(seconds, 3),
        "allocator": allocator_record(args),
    }
    print(json.dumps(report, indent=2))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from mammogmic import GMIC, save_model
    from mammogmic.data.cache import sha256_file
    from mammogmic.data.sample import OFFICIAL_CONTRACT
    from mammogmic.errors import MammogmicError
    from mammogmic.models import read_model_metadata, save_official_checkpoint

    try:
        model = _load(args.source, args.percent_t)
        if args.dest.exists():
            raise FileExistsError(f"{args.dest}: already exists; not overwriting")
        if args.to_official:
            if not isinstance(model, GMIC):
                raise MammogmicError("only GMIC models have an official format")
            save_official_checkpoint(model, args.dest)
        else:
            # The model file carries its input contract, like a trained one: official files were made for the
            # official pipeline; our files keep theirs.
            if args.source.suffix == ".p":
                extra: dict[str, object] = {"input_contract": OFFICIAL_CONTRACT.to_dict()}
            else:
                extra = dict(read_model_metadata(args.source).get("extra") or {})
            extra["converted_from"] = str(args.source)
            extra["converted_from_sha256"] = sha256_file(args.source)
            save_model(model, args.dest, metadata=extra)
    except (MammogmicError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.dest}")
    return 0


def _check_inputs(args: argparse.Namespace, contract: InputContract) -> list[np.ndarray]:
    """One ``(1, C, H, W)`` batch per --check-image (predict's preparation), else one synthetic input."""
    import numpy as np

    from mammogmic.errors import MammogmicError
    from mammogmic.evaluation.inference import PrepareSettings, items_from_paths, prepare_item

    if args.no_check:
        return []
    if not args.check_image:
        # Standardised noise: every saliency cell differs, so no window ties that rounding could flip.
        shape = (1, contract.channels, *contract.input_shape)
        return [np.random.default_rng(0).standard_normal(shape).astype(np.float32)]
    batches = []
    for item in items_from_paths(args.check_image):
        prepared = prepare_item(item, [contract], PrepareSettings())
        if prepared.error is not None:
            raise MammogmicError(f"--check-image: {prepared.error}")
        batches.append(prepared.inputs[0][:1])  # (1, C, H, W): predict's first window
    return batches


def run_export(args: argparse.Namespace) -> int:
    from mammogmic._extras import require
    from mammogmic.errors import MammogmicError
    from mammogmic.evaluation.inference import load_member
    from mammogmic.models.export import OnnxParityError, export_onnx

    if args.onnx.exists():
        print(f"error: {args.onnx}: already exists; not overwriting", file=sys.stderr)
        return 2
    for module in ("onnx", "onnxscript", "onnxruntime"):  # fail before the minutes of loading and tracing
        require(module, "mammogmic export --onnx")
    try:
        member = load_member(args.model, args.percent_t, device="cpu", fuse=True)
        inputs = _check_inputs(args, member.contract)
        metadata = {
            "input_contract": member.contract.to_dict(),
            "source": args.model.name,
            "source_sha256": member.sha256,
            "percent_t": member.percent_t,
        }
        result = export_onnx(
            member.model,
            args.onnx,
            member.contract.input_shape,
            check_inputs=inputs,
            atol=args.atol,
            metadata=metadata,
            opset=args.opset,
        )
    except OnnxParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (MammogmicError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = {
        "onnx": str(result.path),
        "input_shape": list(result.input_shape),
        "outputs": list(result.outputs),
        "opset": result.opset,
        "export_seconds": round(result.seconds, 1),
        "check": None
        if result.check is None
        else {
            "images": result.check.n_images,
            "max_abs_difference": result.check.max_abs,
            "same_patch_locations": result.check.same_locations,
        },
    }
    print(json.dumps(report, indent=2))
    return 0
