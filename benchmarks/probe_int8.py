"""What int8 inference would give GMIC on this CPU: speed against float32 and bf16, accuracy on the official
fixtures. A probe for issue 14's optional int8 item, not a shipped path (benchmarks/README.md says why).

    python benchmarks/probe_int8.py                    # 3 rounds x 5 passes per path, markdown on stdout
    python benchmarks/probe_int8.py --json int8.json

Both backbones are quantized with PyTorch's FX graph mode (``torch.ao.quantization``, x86 engine: oneDNN /
FBGEMM int8 kernels, VNNI where the CPU has it): static, per-channel int8 weights, uint8 activations observed
on the six fixture images (the calibration set is the test set here: the accuracy figures are a best case).
The global network's stem (a 7x7 convolution of the 1-channel image, banded) stays float32; everything after
it, including BatchNorm, ReLU and the residual adds of the pre-activation blocks, runs on quantized tensors.
The local network is quantized whole. The 1x1 saliency head, top-t pooling, attention and classifiers stay
float32, as in the bf16 path.

Accuracy, per fixture image against the official float32 outputs (``expected/*.npz``): ``y_global``; ``y_local``
and ``y_fusion`` with the local branch run on the recorded patches (a patch picked differently changes
``y_local`` by its own content, not by rounding: the criterion of the bf16 conformance test); the largest error
of the normalised saliency map, and whether the six patches are the same.

Speed: whole-model passes at 2944x1920, batch 1, the three paths alternated in one process (``--rounds``
rounds of ``--repeats`` timed passes after two untimed ones), median seconds per image. The process keeps
glibc's own allocator (no ``mammogmic.runtime`` profile), so the float32 row is the fused model on ``fast``,
not ``predict``'s lean default; the ratios are between models, not against ``bench_bf16.py``'s table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "models"))

from test_conformance import NAMES, _reference_input  # noqa: E402

from mammogmic import load_official_checkpoint  # noqa: E402
from mammogmic.models import GMIC, cast_for_bf16, fuse_for_inference  # noqa: E402
from mammogmic.models.resnet import PreActBlock, ResNet22  # noqa: E402
from mammogmic.models.roi import crop_patches, normalize_saliency  # noqa: E402

FIXTURES = (ROOT / ".." / "shared" / "fixtures" / "official_gmic").resolve()


class _GlobalBody(nn.Module):
    """ResNet-22 after its stem, with out-of-place residual adds (FX quantizes ``a + b``, not ``a.add_(b)``)."""

    def __init__(self, net: ResNet22) -> None:
        super().__init__()
        self.stages, self.final_bn = net.stages, net.final_bn
        for block in self.modules():
            if isinstance(block, PreActBlock):
                block.relu = nn.ReLU()  # in place, it would be traced as a mutation
                block.forward = _preact_out_of_place.__get__(block)  # type: ignore[method-assign]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return torch.relu(self.final_bn(x))


class _Plain(nn.Module):
    """A trunk called without ``fine``, so FX traces its native-grid branch."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _preact_out_of_place(self: PreActBlock, x: torch.Tensor) -> torch.Tensor:
    out = self.relu(self.bn1(x))
    shortcut = x if self.downsample is None else self.downsample(out)
    return self.conv2(self.relu(self.bn2(self.conv1(out)))) + shortcut


class _Trunk(nn.Module):
    """A quantized trunk where :class:`GMIC` expects a backbone: float32 in, float32 out, ``fine`` unused
    (the fixture model reads its native grid). ``stem``: float32 layers run before the quantized part."""

    def __init__(self, quantized: nn.Module, stem: ResNet22 | None = None) -> None:
        super().__init__()
        self.quantized, self.stem_net = quantized, stem
        # GMIC's _run_trunk reads the trunk's dtype from its first parameter; the quantized graph has none.
        self.dtype_anchor = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x: torch.Tensor, fine: bool = False) -> torch.Tensor:
        if self.stem_net is not None:
            x = self.stem_net.stem(x)
        return self.quantized(x)


def _quantize(
    module: nn.Module, calibration: list[torch.Tensor], keep_float: tuple[str, ...] = ()
) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    module = copy.deepcopy(module).eval()
    mapping = get_default_qconfig_mapping("x86")
    for name in keep_float:
        mapping = mapping.set_module_name(name, None)
    prepared = prepare_fx(module, mapping, example_inputs=(calibration[0],))
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    return convert_fx(prepared)


def int8_model(plain: GMIC, images: list[torch.Tensor], local_float: tuple[str, ...] = ()) -> GMIC:
    """``plain`` with both backbones quantized, calibrated on ``images`` (full-size model inputs)."""
    torch.backends.quantized.engine = "x86"
    fused = fuse_for_inference(plain).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    with torch.no_grad():
        stems = [fused.global_net.stem(x.contiguous(memory_format=torch.channels_last)) for x in images]
        patches = [plain.retrieve_rois(plain.forward_global(x)[1], (x.shape[2], x.shape[3])) for x in images]
        crops = [
            crop_patches(x, loc, plain.config.crop_size).flatten(0, 1).expand(-1, 3, -1, -1)
            for x, loc in zip(images, patches, strict=True)
        ]
    model = copy.deepcopy(fused)
    model.global_net = _Trunk(_quantize(_GlobalBody(plain.global_net), stems), fused.global_net)  # type: ignore[assignment]
    model.local_net = _Trunk(
        _quantize(_Plain(plain.local_net), crops, tuple(f"net.{n}" for n in local_float))
    )  # type: ignore[assignment]
    model.local_net.conv1 = plain.local_net.conv1  # forward_local reads the stem's input channels
    return model


def accuracy(reference: GMIC, model: GMIC, images: list[torch.Tensor]) -> list[dict[str, Any]]:
    rows = []
    with torch.inference_mode():
        for name, x in zip(NAMES, images, strict=True):
            expected = dict(np.load(FIXTURES / "expected" / f"{name}.npz"))
            ref, out = reference(x), model(x)
            h_crops = model.forward_local(torch.from_numpy(expected["patches"]).unsqueeze(2))
            z, _ = model.attention(h_crops)
            y_local = torch.sigmoid(model.local_classifier(z))
            y_fusion = torch.sigmoid(model.fusion(torch.cat([out.h_g.flatten(2).amax(dim=2), z], dim=1)))
            rows.append(
                {
                    "image": name,
                    "y_global": float(np.abs(out.y_global.numpy() - expected["y_global"]).max()),
                    "y_local": float(np.abs(y_local.numpy() - expected["y_local"]).max()),
                    "y_fusion": float(np.abs(y_fusion.numpy() - expected["y_fusion"]).max()),
                    "map": float(
                        (normalize_saliency(out.saliency) - normalize_saliency(ref.saliency)).abs().max()
                    ),
                    "same_patches": bool((out.patch_locations == ref.patch_locations).all()),
                }
            )
    return rows


def speed(paths: dict[str, nn.Module], x: torch.Tensor, rounds: int, repeats: int) -> dict[str, float]:
    per_round: dict[str, list[float]] = {name: [] for name in paths}
    with torch.inference_mode():
        for model in paths.values():
            model(x), model(x)
        for _ in range(rounds):
            for name, model in paths.items():
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    model(x)
                    times.append(time.perf_counter() - t0)
                per_round[name].append(statistics.median(times))
    return {name: statistics.median(v) for name, v in per_round.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--local-float", default="", help="comma-separated local-network modules kept float32 (e.g. layer4)"
    )
    p.add_argument("--json", help="also write the figures as JSON here")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*quantize.*deprecated")  # said once, in the output below
    plain = load_official_checkpoint(FIXTURES / "official_format_seed0.p", percent_t=0.02)
    images = [torch.from_numpy(_reference_input(FIXTURES, n).copy())[None, None] for n in NAMES]
    t0 = time.perf_counter()
    int8 = int8_model(plain, images, tuple(filter(None, args.local_float.split(","))))
    prepare_s = time.perf_counter() - t0
    fp32 = fuse_for_inference(plain).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    paths = {
        "float32 (predict's default)": fp32,
        "bf16-cast (predict --amp bf16)": cast_for_bf16(fp32),
        "int8": int8,
    }
    rows = accuracy(plain, int8, images)
    seconds = speed(paths, images[0].contiguous(memory_format=torch.channels_last), args.rounds, args.repeats)

    print(
        f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; calibration + conversion {prepare_s:.1f} s\n"
    )
    print(
        "| image | y_global | y_local (recorded patches) | y_fusion (recorded patches) | map error | same patches |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['image']} | {r['y_global']:.4f} | {r['y_local']:.4f} | {r['y_fusion']:.4f} | "
            f"{r['map']:.3f} | {'yes' if r['same_patches'] else 'no'} |"
        )
    base = seconds["float32, fused, channels-last"]
    print("\n| path | s / image (median) | ratio to float32 |\n| --- | --- | --- |")
    for name, s in seconds.items():
        print(f"| {name} | {s:.3f} | {s / base:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"accuracy": rows, "seconds": seconds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
