"""Train a GMIC config with every spatial kernel of the global network held mirror-symmetric left to right.

    python scripts/mirror_symmetric_run.py CONFIG.yaml --out RUN_DIR

An experiment of docs/localization.md ("Where the maps put their mass"), not a training option: such a network
cannot displace its saliency response sideways, which tests whether the one-cell displacement of the demo's maps is
learned. After initialisation and after every optimizer step each kernel ``w`` of the global network wider than one
column is replaced by ``(w + flip(w)) / 2`` (flip along the width); the model files are ordinary GMIC files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.optim.optimizer as optimizer_hooks
import yaml
from torch import nn

import mammogmic.training.loop as loop
from mammogmic.training.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path, help="a training config (e.g. a demo run's config.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="new run folder")
    args = parser.parse_args(argv)

    kernels: list[nn.Conv2d] = []

    def symmetrize() -> None:
        with torch.no_grad():
            for conv in kernels:
                conv.weight.copy_(0.5 * (conv.weight + conv.weight.flip(-1)))

    build = loop.build_model

    def build_symmetric(config: TrainConfig) -> nn.Module:
        model = build(config)
        global_net = model.get_submodule("global_net")
        kernels.extend(m for m in global_net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[1] > 1)
        symmetrize()
        print(f"mirror-symmetric kernels: {len(kernels)} convolutions of the global network", flush=True)
        return model

    loop.build_model = build_symmetric
    optimizer_hooks.register_optimizer_step_post_hook(lambda *_: symmetrize())
    config = TrainConfig.from_dict(yaml.safe_load(args.config.read_text()))
    loop.Trainer(config, args.out).fit()
    held = all(torch.equal(conv.weight, conv.weight.flip(-1)) for conv in kernels)
    print(f"kernels symmetric at the end: {held}", flush=True)
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())
