"""``mammogmic train``, ``mammogmic tune``, ``mammogmic demo`` and ``mammogmic ablate``.

Heavy imports (torch, optuna) happen inside each ``run`` so that ``mammogmic --help`` stays fast. ``train``,
``demo`` (TensorBoard logs) and ``tune`` (Optuna) need the ``train`` extra and say so when it is missing
(exit 2); ``ablate`` writes no TensorBoard logs and runs on the light install.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from mammogmic.cli import non_negative_int, positive_int, progress_bar, show_progress
from mammogmic.runtime import AMP_MODES

logger = logging.getLogger(__name__)

EXIT_ERROR = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT


def add_parser(subparsers: Any) -> None:
    """Register the training commands."""
    p = subparsers.add_parser(
        "train",
        help="train GMIC from a YAML config (+ --set overrides)",
        description=(
            "Train GMIC end to end (Adam, paper Eq. 13 loss) with validation by malignant AUC, early stopping "
            "and best-checkpoint selection. CONFIG is a YAML file or a packaged preset name "
            "(gmic_resnet18, gmic_resnet34, gmic_resnet50, tiny_cpu). Writes RUN_DIR/config.yaml, last.pt, "
            "best.pt, best_model.safetensors, steps.csv, epochs.csv, tensorboard/, result.json. Several GPUs: "
            "torchrun --nproc_per_node=N -m mammogmic.cli.main train ... Fine-tuning: --init, and in the "
            "config finetune.freeze (alias model.freeze) and optim.backbone_lr_ratio (docs/training.md). "
            "Ctrl-C, SIGTERM or SIGUSR1 stop after the current optimizer step and save last.pt (exit code "
            "128 + signal number; continue with --resume); a second Ctrl-C aborts at once."
            " model.type dmv trains DMV-CNN (view-wise; four-view exams) and model.type patch its patch "
            "classifier (docs/dmv.md)."
        ),
    )
    p.add_argument("config", help="YAML config file or preset name")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.SUB=VALUE",
        help="override a config field (YAML value), e.g. --set optim.lr=1e-5 (repeatable)",
    )
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last.pt (written every epoch, every "
        "schedule.checkpoint_every_steps steps, and when Ctrl-C/SIGTERM/SIGUSR1 stops the run)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out that holds files of an earlier run: they are moved to "
        "OUT/replaced-<time>/ (without it such a folder is refused, never appended to)",
    )
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        metavar="PATH",
        help="fine-tune: start from these weights, an official release .p (sample_model_1.p), a mammogmic "
        ".safetensors or a training checkpoint (best.pt); loaded strictly, every tensor must match "
        "(finetune.init; ignored on --resume, which continues from last.pt)",
    )
    p.add_argument(
        "--init-exclude",
        action="append",
        default=None,
        metavar="PATTERN",
        help="with --init: re-initialise the tensors whose names match PATTERN instead of loading them "
        "(they need not be in the file nor match its shape): a glob on our names, where a module name "
        "matches everything under it (fusion, global_net.stem_conv, 'attention.*'), or re:REGEX; "
        "repeatable (finetune.init_exclude)",
    )
    p.add_argument(
        "--percent-t",
        type=float,
        default=None,
        metavar="T",
        help="with --init: t of the checkpoint's model, which official .p files do not record (released "
        "models 1-5: 0.02, 0.03, 0.03, 0.05, 0.1); sets model.percent_t (finetune.percent_t)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train, allocator_profile="fast")

    t = subparsers.add_parser(
        "tune",
        help="random hyper-parameter search (Optuna, resumable SQLite study)",
        description=(
            "The paper's random search: lr log-uniform in 10^[lr-range], beta log-uniform in 10^[beta-range], "
            "t from --t-choices. Trials are stored in OUT/study.db (SQLite) so an interrupted search continues "
            "where it stopped when rerun with the same --out (and --seed), drawing new points, never one already "
            "tried; a trial killed or stopped with Ctrl-C is retried with its parameters and resumes from its "
            "last checkpoint. The top-k distinct models are exported to OUT/top_k/ for ensembling."
        ),
    )
    t.add_argument("config", help="YAML config file or preset name")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE")
    t.add_argument("--out", required=True, type=Path, help="search folder (study.db, trials/, top_k/)")
    t.add_argument(
        "--trials", type=positive_int, default=20, help="total number of finished trials wanted (default 20)"
    )
    t.add_argument(
        "--lr-range",
        type=float,
        nargs=2,
        default=(-5.5, -4.0),
        metavar=("LO", "HI"),
        help="log10 range of the learning rate (default -5.5 -4)",
    )
    t.add_argument(
        "--beta-range",
        type=float,
        nargs=2,
        default=(-5.5, -3.5),
        metavar=("LO", "HI"),
        help="log10 range of beta (default -5.5 -3.5)",
    )
    t.add_argument(
        "--t-choices", default="0.02,0.03,0.05,0.1", help="comma-separated t values (default %(default)s)"
    )
    t.add_argument(
        "--top-k", type=positive_int, default=5, help="models to export for ensembling (default 5)"
    )
    t.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random search (a study keeps the seed it started with)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_tune, allocator_profile="fast")

    d = subparsers.add_parser(
        "demo",
        help="synthetic data -> train a small GMIC -> test AUC, saliency Dice and figures (CPU, minutes)",
        description=(
            "Generate a synthetic screening dataset, train a reduced-size GMIC on it, evaluate on the held-out "
            "test split and write DIR/metrics.json (test.malignant_auroc, test.benign_auroc, "
            "test.malignant_dice, seconds), DIR/roc.png, DIR/figures/*.png and DIR/predictions.csv. "
            "Everything, the generated data included, stays inside DIR."
        ),
    )
    d.add_argument("--out", required=True, type=Path, help="report folder (must be new or empty)")
    d.add_argument("--exams", type=positive_int, default=None, help="synthetic exams (default 600)")
    d.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default 24)")
    d.add_argument("--seed", type=non_negative_int, default=None, help="seed (default 0)")
    d.add_argument(
        "-j", "--workers", type=positive_int, default=None, help="data-generation processes (default 2)"
    )
    d.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    d.add_argument(
        "--amp",
        choices=AMP_MODES,
        default=None,
        help="training precision: auto (default: bf16 autocast where the CPU has native bf16/AMX, else float32), "
        "bf16 or none (float32); validation and test are scored in float32 either way, as predict scores",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=run_demo_cmd, allocator_profile="fast")

    a = subparsers.add_parser(
        "ablate",
        help="the paper's ablation table on synthetic data (heads, attention, patches, pooling, K)",
        description=(
            "Train the demo's reduced GMIC and its ablated variants once per seed (each seed its own synthetic "
            "set) and write OUT/ablations.md (AUROCs, and the Dice-selected model's malignant Dice and share of "
            "negative test images its map marks, as the demo's metrics.json reports them: mean ± sd over seeds, "
            "paired t-test of each row against the base run), ablations.csv, ablations_runs.csv (per seed) and ablations.json: fusion vs global vs local "
            "vs average heads, gated vs uniform attention, saliency vs random patches, top-t% vs GAP vs GMP, "
            "K=1..6. Rows run one after another, all seeds of a row first. Rerunning with the same --out "
            "resumes unfinished runs and reuses evaluated ones."
        ),
    )
    a.add_argument("--out", required=True, type=Path, help="output folder")
    a.add_argument(
        "--data", type=Path, default=None, help="reuse a generated synthetic set (folder or manifest)"
    )
    a.add_argument(
        "--exams",
        type=positive_int,
        default=None,
        help="synthetic exams per seed (default 600, the demo's)",
    )
    a.add_argument(
        "--epochs", type=positive_int, default=None, help="epochs per run (default 24, the demo's)"
    )
    a.add_argument(
        "--seeds",
        default="0,1,2",
        help="comma-separated seeds; every row is trained once per seed (default 0,1,2)",
    )
    a.add_argument(
        "--groups",
        default="head,attention,patches,aggregation,k",
        help="comma-separated subset of head,attention,patches,aggregation,k",
    )
    a.add_argument(
        "--ks",
        default=None,
        help="comma-separated K values of the k group (default 1,2,3,4,5,6; the base run's K is not trained "
        "twice)",
    )
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.set_defaults(func=run_ablate, allocator_profile="fast")


# -- progress ---------------------------------------------------------------------------------------------
class _Progress:
    """Turns the library's ``callback(event, info)`` into tqdm bars (one per epoch / evaluation pass)."""

    def __init__(self, no_progress: bool) -> None:
        self.enabled = show_progress(no_progress)
        self.bar: Any = None
        self.kind = ""

    def _bar(self, kind: str, total: int, desc: str) -> Any:
        if self.bar is not None and (self.kind != kind or self.bar.total != total or self.bar.n >= total):
            self.bar.close()
            self.bar = None
        if self.bar is None:
            self.bar = progress_bar(
                total,
                desc=desc,
                unit="step" if kind == "train" else "img",
                leave=False,
                dynamic_ncols=True,
            )
            self.kind = kind
        return self.bar

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "epoch":
            self.close()
            val = info.get("val_malignant_auroc")
            val_txt = f", val malignant AUROC {val:.3f}" if isinstance(val, float) else ""
            print(
                f"epoch {info['epoch'] + 1}/{info['epochs']}: train loss {info['train_loss']:.4f}{val_txt}"
                f" ({info['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            return
        if not self.enabled:
            return
        if event == "step":
            bar = self._bar("train", info["steps_per_epoch"], f"epoch {info['epoch'] + 1}")
            bar.n = info["step_in_epoch"]
            bar.set_postfix(loss=f"{info['loss']:.3f}", img_s=f"{info['images_per_s']:.1f}", refresh=False)
            bar.refresh()
        elif event == "eval":
            bar = self._bar("eval", info["total"] * info["passes"], "evaluating")
            bar.n = info["pass"] * info["total"] + info["done"]
            bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_ERROR


# -- train ------------------------------------------------------------------------------------------------
def run_train(args: argparse.Namespace) -> int:
    """``mammogmic train``; under ``torchrun`` every rank runs it and rank 0 alone prints the summary."""
    import torch.distributed as dist

    from mammogmic._extras import require
    from mammogmic._outdir import removed_if_unused
    from mammogmic.errors import MammogmicError

    require("tensorboard", "mammogmic train (its TensorBoard logs)")
    from mammogmic.training.config import load_config
    from mammogmic.training.distributed import barrier
    from mammogmic.training.loop import NonFiniteLossError, Trainer, TrainingInterrupted

    if args.init is not None and not args.init.is_file():
        return _fail(FileNotFoundError(f"--init: {args.init}: no such file"))
    if args.resume and args.overwrite:
        return _fail(
            ValueError("--resume continues the run in --out, --overwrite replaces it: pass only one")
        )
    progress = _Progress(args.no_progress)
    trainer: Trainer | None = None
    try:
        config = load_config(args.config, _train_overrides(args))
        _check_manifest(config)
        with removed_if_unused(args.out):  # a run that fails to start leaves no empty --out
            trainer = Trainer(config, args.out, callback=progress)
            result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
            # Every rank tears its process group down at the same moment: a gloo rank that destroys its group
            # while another still holds its own open aborted at exit now and then (SIGABRT, "terminate called
            # without an active exception"; 3 of 50 two-rank runs without this barrier, 0 of 60 with it).
            barrier(trainer.dist)
    except TrainingInterrupted as exc:
        progress.close()
        if trainer is None or trainer.dist.is_main:
            print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except NonFiniteLossError as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    except MammogmicError as exc:
        progress.close()
        return _fail(exc)
    finally:
        if dist.is_initialized():  # joined by the trainer under torchrun
            dist.destroy_process_group()
    progress.close()
    if trainer.dist.is_main:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        print(f"run folder: {args.out} (result.json, epochs.csv, best_model.safetensors)", file=sys.stderr)
    return 0


def _check_manifest(config: Any) -> None:
    """No manifest, or one that is not there, is a bad argument (exit 2), found before a run folder or study is
    made."""
    from mammogmic.errors import ManifestError

    manifest = config.data.manifest
    if not manifest:
        raise ManifestError(
            "data.manifest: no manifest given (set it in the YAML or with --set data.manifest=...)"
        )
    if not Path(manifest).is_file():
        raise ManifestError(f"data.manifest: {manifest}: manifest not found")


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides, then the fine-tuning flags (which win over the YAML file and ``--set``).

    Values are written as JSON, which the override parser reads as YAML (quoted paths stay strings).
    """
    overrides = list(args.overrides)
    if args.init is not None:
        overrides.append(f"finetune.init={json.dumps(str(args.init.resolve()))}")
    if args.init_exclude is not None:
        overrides.append(f"finetune.init_exclude={json.dumps(list(args.init_exclude))}")
    if args.percent_t is not None:
        overrides += [f"finetune.percent_t={args.percent_t!r}", f"model.percent_t={args.percent_t!r}"]
    return overrides


# -- tune -------------------------------------------------------------------------------------------------
def run_tune(args: argparse.Namespace) -> int:
    from mammogmic._extras import require
    from mammogmic._json import to_json_text
    from mammogmic._outdir import removed_if_unused
    from mammogmic.errors import MammogmicError
    from mammogmic.training.config import load_config
    from mammogmic.training.tune import TuneSettings, tune  # needs optuna: MissingExtraError without it

    require("tensorboard", "mammogmic tune (each trial's TensorBoard logs)")
    import optuna

    optuna.logging.set_verbosity(logging.getLogger().getEffectiveLevel())  # our -v, not Optuna's INFO

    try:
        t_choices = tuple(float(v) for v in args.t_choices.split(",") if v.strip())
    except ValueError:
        return _fail(ValueError(f"--t-choices: expected comma-separated numbers, got {args.t_choices!r}"))
    progress = _Progress(args.no_progress)
    try:
        config = load_config(args.config, args.overrides)
        _check_manifest(config)  # else every trial fails alike
        settings = TuneSettings(
            n_trials=args.trials,
            lr_log10=tuple(args.lr_range),
            beta_log10=tuple(args.beta_range),
            t_choices=t_choices,
            top_k=args.top_k,
            seed=args.seed,
        )
        with removed_if_unused(args.out):
            summary = tune(config, args.out, settings, callback=progress)
    except MammogmicError as exc:
        progress.close()
        return _fail(exc)
    except KeyboardInterrupt:
        progress.close()
        print(
            f"interrupted: the running trial is kept; rerun the same command to resume it ({args.out / 'study.db'})",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    progress.close()
    print(to_json_text(summary), end="")
    print(f"study: {args.out / 'study.db'}; top-{args.top_k} models in {args.out / 'top_k'}", file=sys.stderr)
    return 0


# -- demo -------------------------------------------------------------------------------------------------
def run_demo_cmd(args: argparse.Namespace) -> int:
    from mammogmic._extras import require
    from mammogmic.errors import MammogmicError

    require("tensorboard", "mammogmic demo (the training run's TensorBoard logs)")
    from mammogmic._outdir import removed_if_unused
    from mammogmic.training.demo import DemoSettings, run_demo

    defaults = DemoSettings()

    def given(value: Any, default: Any) -> Any:  # the parser refuses 0 and negatives; None = not given
        return default if value is None else value

    settings = DemoSettings(
        n_exams=given(args.exams, defaults.n_exams),
        epochs=given(args.epochs, defaults.epochs),
        seed=given(args.seed, defaults.seed),
        workers=given(args.workers, defaults.workers),
        threads=args.threads,
        amp=given(args.amp, defaults.amp),
    )
    progress = _Progress(args.no_progress)
    started = time.perf_counter()
    print(
        f"mammogmic demo: {settings.n_exams} synthetic exams at {settings.size[0]}x{settings.size[1]}, "
        f"{settings.epochs} epochs -> {args.out}",
        file=sys.stderr,
        flush=True,
    )
    synth_bar: Any = None

    def synth_progress(done: int) -> None:
        nonlocal synth_bar
        if not progress.enabled:
            return
        if synth_bar is None:
            synth_bar = progress_bar(settings.n_exams, desc="generating exams", unit="exam", leave=False)
        synth_bar.n = done
        synth_bar.refresh()
        if done >= settings.n_exams:
            synth_bar.close()

    try:
        with removed_if_unused(args.out):
            report = run_demo(args.out, settings, callback=progress, synth_progress=synth_progress)
    except MammogmicError as exc:
        progress.close()
        return _fail(exc)
    progress.close()
    test = report["test"]

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    print(
        f"test split ({test['n_images']} images): malignant AUROC {f(test['malignant_auroc'])}, "
        f"benign AUROC {f(test['benign_auroc'])}, malignant saliency Dice {f(test['malignant_dice'])}"
    )
    print(f"finished in {time.perf_counter() - started:.0f} s")
    print(
        f"report: {args.out / 'metrics.json'} (figures: {args.out / 'figures'}, ROC: {args.out / 'roc.png'})"
    )
    return 0


# -- ablate -----------------------------------------------------------------------------------------------
def _int_list(option: str, text: str) -> tuple[int, ...]:
    """``"1,2,3"`` -> ``(1, 2, 3)``; a ValueError naming ``option`` otherwise (an empty list included)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise ValueError(f"{option}: expected comma-separated integers, got {text!r}")
    return values


def run_ablate(args: argparse.Namespace) -> int:
    from mammogmic._outdir import removed_if_unused
    from mammogmic.errors import MammogmicError
    from mammogmic.training.ablate import AblationSettings, describe_row, run_ablations

    groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    valid = {"head", "attention", "patches", "aggregation", "k"}
    if not groups or set(groups) - valid:
        return _fail(
            ValueError(f"--groups: expected a subset of {','.join(sorted(valid))}, got {args.groups!r}")
        )
    try:
        seeds = _int_list("--seeds", args.seeds)
        ks = _int_list("--ks", args.ks) if args.ks is not None else AblationSettings.ks
    except ValueError as exc:
        return _fail(exc)
    progress = _Progress(args.no_progress)

    def on_run(name: str, row: dict[str, Any]) -> None:
        progress.close()
        print(f"{name}: {describe_row(row)}", file=sys.stderr, flush=True)

    try:
        settings = AblationSettings(seeds=seeds, groups=groups, ks=ks)
        given = {"n_exams": args.exams, "epochs": args.epochs}
        settings = dataclasses.replace(settings, **{k: v for k, v in given.items() if v is not None})
        with removed_if_unused(args.out):
            run_ablations(args.out, settings, data=args.data, callback=progress, on_run=on_run)
    except MammogmicError as exc:
        progress.close()
        return _fail(exc)
    progress.close()
    print((args.out / "ablations.md").read_text())
    print(f"table: {args.out / 'ablations.md'} (csv, json beside it)", file=sys.stderr)
    return 0
