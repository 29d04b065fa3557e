"""Fine-tuning: start training from pretrained weights, re-initialise some tensors, freeze parts.

The settings live in :class:`~mammogmic.training.config.FinetuneConfig` (``finetune`` section) and
``optim.backbone_lr_ratio``. The loop calls :func:`prepare_model` once after building the model,
:func:`keep_frozen_in_eval` after every ``model.train()`` and :func:`param_groups` to build the optimizer.

Loading is strict: every tensor of the model must come from the file with the same shape, and the file may hold
nothing else, except the names that ``finetune.init_exclude`` matches: those keep their fresh (seeded)
initialisation. Names are ours (``fusion.weight``); official ``.p`` files are renamed with the official key map
of :mod:`mammogmic.models.checkpoint` first, and read with ``torch.load(weights_only=True)`` like every other
``.p``/``.pt`` file, so a file never runs code.

Where the weights came from (path, SHA-256, format, loaded and re-initialised names) is written to
``RUN_DIR/init.json`` and into the metadata of every exported model (``extra["init"]``).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mammogmic.data.cache import sha256_file
from mammogmic.errors import CheckpointError, ConfigError
from mammogmic.models.checkpoint import (
    check_state_matches,
    official_percent_t,
    official_to_ours,
    read_state_dict,
    specs_of,
)
from mammogmic.training.config import FREEZE_PARTS, TrainConfig

__all__ = [
    "INIT_RECORD",
    "InitReport",
    "apply_freeze",
    "initialize_model",
    "keep_frozen_in_eval",
    "load_init_state",
    "matching_names",
    "param_groups",
    "prepare_model",
]

logger = logging.getLogger(__name__)

#: File in the run folder that records where the initial weights came from.
INIT_RECORD = "init.json"

SourceFormat = Literal["official", "mammogmic"]


@dataclass(frozen=True)
class InitReport:
    """What :func:`initialize_model` did.

    Attributes:
        path: the checkpoint file (absolute).
        sha256: SHA-256 of the file's bytes.
        source_format: ``official`` (official key names, renamed to ours) or ``mammogmic`` (our names).
        loaded: state-dict names (ours) whose values came from the file.
        excluded: state-dict names matched by ``finetune.init_exclude``, kept at their fresh initialisation.
    """

    path: str
    sha256: str
    source_format: SourceFormat
    loaded: tuple[str, ...]
    excluded: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "loaded": list(self.loaded), "excluded": list(self.excluded)}

    def provenance(self) -> dict[str, Any]:
        """The short form stored in exported models: the file, its hash, and what was re-initialised."""
        return {
            "path": self.path,
            "sha256": self.sha256,
            "source_format": self.source_format,
            "n_loaded": len(self.loaded),
            "excluded": list(self.excluded),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InitReport:
        return cls(
            path=str(data["path"]),
            sha256=str(data["sha256"]),
            source_format=data["source_format"],
            loaded=tuple(data["loaded"]),
            excluded=tuple(data["excluded"]),
        )


# -- reading the checkpoint ------------------------------------------------------------------------------
def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], SourceFormat, float | None]:
    """(state dict in our names where the file uses official ones, format, t recorded in the file)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        try:
            recorded = json.loads(header.get("model_config", "{}")).get("percent_t")
        except (json.JSONDecodeError, AttributeError):
            recorded = None
        return state, "mammogmic", recorded if isinstance(recorded, int | float) else None
    state = read_state_dict(path)  # weights_only=True, sizes checked first; refuses code
    renamed = {key: official_to_ours(key) for key in state}
    if 2 * sum(name is not None for name in renamed.values()) <= len(state):
        return state, "mammogmic", None
    # Official names; a key without a rule keeps its name and is reported as unexpected.
    return {renamed[key] or key: value for key, value in state.items()}, "official", None


def load_init_state(path: str | os.PathLike[str], percent_t: float | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint under our names (official ``.p`` files are renamed).

    Args:
        path: an official ``.p``, a mammogmic ``.safetensors`` or a training checkpoint (``.pt`` with ``model``).
        percent_t: the t the model will use; a warning is logged when the file records (``.safetensors``) or its
            name implies (``sample_model_N.p``) another t. It does not change the tensors.

    Raises:
        CheckpointError: missing, unreadable or unsafe file (the message names it).
    """
    path = Path(path)
    state, source_format, recorded = _read_state(path)
    if percent_t is not None:
        _warn_about_t(path, source_format, recorded, percent_t, explicit=True)
    return state


def _warn_about_t(
    path: Path, source_format: str, recorded: float | None, percent_t: float, *, explicit: bool
) -> None:
    expected = recorded
    if expected is None and path.suffix == ".p":
        try:
            expected = official_percent_t(path)  # the released t of sample_model_N.p (the one rule)
        except CheckpointError:
            expected = None
    if expected is not None and not math.isclose(expected, percent_t, abs_tol=1e-12):
        logger.warning(
            "%s: its model used t = %s but model.percent_t is %s (set --percent-t to choose)",
            path,
            expected,
            percent_t,
        )
    elif expected is None and source_format == "official" and not explicit:
        logger.warning(
            "%s: official files do not record t; using model.percent_t = %s (set --percent-t to choose)",
            path,
            percent_t,
        )


# -- matching names --------------------------------------------------------------------------------------
def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def matching_names(names: Iterable[str], patterns: Iterable[str]) -> set[str]:
    """The names matched by any pattern: a glob (a module name also matches everything under it) or ``re:``."""
    patterns = tuple(patterns)
    return {name for name in names if any(_matches(name, p) for p in patterns)}


def _check_patterns_match(patterns: tuple[str, ...], names: list[str]) -> None:
    """Each pattern must match something: an unmatched one is almost surely a typo."""
    for i, pattern in enumerate(patterns):
        if any(_matches(name, pattern) for name in names):
            continue
        prefixes = {".".join(name.split(".")[:n]) for name in names for n in range(1, name.count(".") + 2)}
        close = difflib.get_close_matches(pattern, sorted(prefixes), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"finetune.init_exclude[{i}]: {pattern!r} matches no tensor of the model or file{hint}"
        )


# -- initialising the model ------------------------------------------------------------------------------
def initialize_model(model: nn.Module, config: TrainConfig) -> InitReport:
    """Copy ``config.finetune.init`` into ``model``, except the names ``finetune.init_exclude`` matches.

    The model keeps its fresh initialisation for the excluded names. Nothing is changed when the check fails.

    Raises:
        CheckpointError: unreadable file, or missing / unexpected / shape-mismatched tensors (all listed, with our
            names and, for official files, the official ones).
        ConfigError: an ``init_exclude`` pattern that matches nothing.
    """
    ft = config.finetune
    path = Path(ft.init).expanduser().resolve()
    file_state, source_format, recorded = _read_state(path)
    model_t = getattr(config.model, "percent_t", None)
    if model_t is not None:
        _warn_about_t(path, source_format, recorded, model_t, explicit=ft.percent_t is not None)
    expected = model.state_dict()
    _check_patterns_match(ft.init_exclude, [*expected, *file_state])
    excluded = matching_names(expected, ft.init_exclude)
    ignored = matching_names(file_state, ft.init_exclude)

    check_state_matches(
        path,
        specs_of(expected),
        specs_of(file_state),
        official=source_format == "official",
        skip=excluded | ignored,
        hint=". Fix the model config, or re-initialise tensors on purpose with --init-exclude PATTERN "
        "(finetune.init_exclude; our names, e.g. 'fusion' or 'global_net.stem_conv')",
    )
    loaded = [k for k in expected if k in file_state and k not in excluded]
    model.load_state_dict({**expected, **{k: file_state[k] for k in loaded}}, strict=True)
    report = InitReport(
        path=str(path),
        sha256=sha256_file(Path(path)),
        source_format=source_format,
        loaded=tuple(loaded),
        excluded=tuple(k for k in expected if k in excluded),
    )
    logger.info(
        "initialised from %s (%s, sha256 %s): %d tensors loaded, %d re-initialised",
        path,
        source_format,
        report.sha256[:12],
        len(report.loaded),
        len(report.excluded),
    )
    return report


# -- freezing and optimizer groups -----------------------------------------------------------------------
def _part_modules(model: nn.Module, parts: Iterable[str]) -> list[nn.Module]:
    modules = []
    for part in dict.fromkeys(parts):
        if part not in FREEZE_PARTS:
            raise ConfigError(f"finetune.freeze: unknown part {part!r} (valid: {', '.join(FREEZE_PARTS)})")
        module = getattr(model, FREEZE_PARTS[part], None)
        if not isinstance(module, nn.Module):
            raise ConfigError(f"finetune.freeze: the model has no {part!r} part ({FREEZE_PARTS[part]})")
        if not any(True for _ in module.parameters()):
            raise ConfigError(
                f"finetune.freeze: the model's {part!r} part has no weights of its own "
                f"(model.saliency_head: fusion reads the fusion head's); freeze 'fusion' instead"
                if part == "saliency"
                else f"finetune.freeze: the model's {part!r} part has no weights of its own"
            )
        modules.append(module)
    return modules


def apply_freeze(model: nn.Module, parts: Iterable[str]) -> list[str]:
    """``requires_grad=False`` for every parameter of the named parts, which are put in eval mode.

    Returns:
        The frozen parameter names.
    """
    frozen = {id(p) for module in _part_modules(model, parts) for p in module.parameters()}
    for module in _part_modules(model, parts):
        module.requires_grad_(False)
    keep_frozen_in_eval(model, parts)
    return [name for name, p in model.named_parameters() if id(p) in frozen]


def keep_frozen_in_eval(model: nn.Module, parts: Iterable[str]) -> None:
    """Put the frozen parts back in eval mode (call after ``model.train()``): their batch norms then normalise
    with, and do not update, the running statistics."""
    for module in _part_modules(model, parts):
        module.eval()


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Optimizer parameter groups over the trainable parameters.

    With ``finetune.init`` and ``optim.backbone_lr_ratio != 1``: group ``pretrained`` (loaded from the file) at
    ``lr * backbone_lr_ratio`` first, then group ``new`` (matched by ``finetune.init_exclude``) at ``lr``; empty
    groups are left out. Otherwise one group at ``lr``. The grouping depends only on the config and the
    parameter names, so a resumed run rebuilds the same groups.

    Raises:
        ConfigError: every parameter is frozen.
    """
    o, ft = config.optim, config.finetune
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError(f"finetune.freeze: {list(ft.freeze)} freezes every parameter; nothing to train")
    if not ft.init or o.backbone_lr_ratio == 1.0:
        return [{"params": [p for _, p in named], "lr": o.lr}]
    new = matching_names([name for name, _ in named], ft.init_exclude)
    groups = [
        {
            "params": [p for n, p in named if n not in new],
            "lr": o.lr * o.backbone_lr_ratio,
            "name": "pretrained",
        },
        {"params": [p for n, p in named if n in new], "lr": o.lr, "name": "new"},
    ]
    return [g for g in groups if g["params"]]


# -- the loop's entry point ------------------------------------------------------------------------------
def prepare_model(
    model: nn.Module,
    config: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool,
    write: bool = True,
) -> InitReport | None:
    """Initialise from ``finetune.init`` on a fresh start and freeze ``finetune.freeze``.

    On a fresh start the report is written to ``run_dir/init.json`` (when ``write``; rank 0 under DDP). On resume
    the weights come from the training checkpoint, so the file is not read again and the report is the one
    recorded in ``init.json`` (``None`` if absent). Freezing is applied in both cases.
    """
    ft = config.finetune
    record = Path(run_dir) / INIT_RECORD
    report: InitReport | None = None
    if resume:
        if record.is_file():
            report = InitReport.from_dict(json.loads(record.read_text(encoding="utf-8")))
    elif ft.init:
        report = initialize_model(model, config)
        if write:
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_name(record.name + ".tmp")
            tmp.write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
            os.replace(tmp, record)
    if ft.freeze:
        frozen = apply_freeze(model, ft.freeze)
        logger.info("frozen parts %s: %d parameter tensors", ", ".join(ft.freeze), len(frozen))
    return report
