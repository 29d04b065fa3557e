"""Random hyper-parameter search (the paper's procedure) with Optuna and a SQLite study that survives kills.

Search space (paper): ``lr ~ 10^U[-5.5, -4]``, ``beta ~ 10^U[-5.5, -3.5]``, ``t`` from a set. Each trial trains a
full run into ``OUT/trials/trial_NNNN`` and reports its best validation metric. The study lives in
``OUT/study.db``; rerunning the same command continues it until ``n_trials`` trials have finished. A trial left
``RUNNING`` by a killed process is marked failed and re-queued with the same parameters, and the retry resumes
that trial's run folder from its ``last.pt`` (so one search folder must be driven by one process at a time). At the end the ``top_k`` best models are copied
to ``OUT/top_k/`` (``rank1_trialNNNN.safetensors``...) with ``OUT/top_k/top_k.json`` describing them.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mammogmic.errors import ConfigError, MammogmicError
from mammogmic.training.config import TrainConfig
from mammogmic.training.loop import NonFiniteLossError, Trainer

__all__ = ["TuneSettings", "tune"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneSettings:
    """Search settings.

    Attributes:
        n_trials: total finished trials wanted (finished = complete or failed with a non-finite loss).
        lr_log10: log10 range of the learning rate.
        beta_log10: log10 range of beta.
        t_choices: candidate t values of top-t% pooling.
        top_k: models exported for ensembling.
        seed: seed of the random sampler.
    """

    n_trials: int = 20
    lr_log10: tuple[float, float] = (-5.5, -4.0)
    beta_log10: tuple[float, float] = (-5.5, -3.5)
    t_choices: tuple[float, ...] = (0.02, 0.03, 0.05, 0.1)
    top_k: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise ConfigError(f"n_trials: must be >= 1, got {self.n_trials}")
        for name in ("lr_log10", "beta_log10"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                raise ConfigError(f"{name}: need low < high, got {lo}, {hi}")
        if not self.t_choices or any(not 0 < t <= 1 for t in self.t_choices):
            raise ConfigError(f"t_choices: need values in (0, 1], got {self.t_choices}")
        if self.top_k < 1:
            raise ConfigError(f"top_k: must be >= 1, got {self.top_k}")


def tune(
    config: TrainConfig,
    out_dir: str | Path,
    settings: TuneSettings = TuneSettings(),
    *,
    callback: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or continue) the search; return a summary (also written to ``OUT/summary.json``)."""
    import optuna

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    higher = config.schedule.val_metric != "val_loss"
    study = optuna.create_study(
        study_name="gmic",
        storage=storage,
        load_if_exists=True,
        direction="maximize" if higher else "minimize",
        sampler=optuna.samplers.RandomSampler(seed=settings.seed),
    )
    study.set_user_attr("base_config", config.to_dict())
    # Trials a killed process left RUNNING: fail them and queue the same parameters again (resumed below).
    for old in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(old._trial_id, optuna.trial.TrialState.FAIL)
        run_dir = old.user_attrs.get("run_dir")
        study.enqueue_trial(dict(old.params), user_attrs={"resume_from": run_dir} if run_dir else None)
        logger.info("trial %d was interrupted; queued again (resuming %s)", old.number, run_dir)

    def objective(trial: optuna.Trial) -> float:
        lr = 10 ** trial.suggest_float("log10_lr", *settings.lr_log10)
        beta = 10 ** trial.suggest_float("log10_beta", *settings.beta_log10)
        t = trial.suggest_categorical("percent_t", list(settings.t_choices))
        resume_from = trial.user_attrs.get("resume_from")
        run = Path(resume_from) if resume_from else out / "trials" / f"trial_{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run))
        cfg = config.replace(**{"optim.lr": lr, "loss.beta": beta, "model.percent_t": float(t)})
        resume = (run / "last.pt").exists()
        logger.info(
            "trial %d: lr=%.3g beta=%.3g t=%s%s", trial.number, lr, beta, t, " (resumed)" if resume else ""
        )
        try:
            result = Trainer(cfg, run, callback=callback).fit(resume=resume)
        except NonFiniteLossError as exc:
            trial.set_user_attr("error", str(exc))
            raise optuna.TrialPruned(str(exc)) from exc
        value = result.best_metric
        if value is None or not math.isfinite(value):
            raise optuna.TrialPruned("no finite validation metric")
        trial.set_user_attr("best_epoch", result.best_epoch)
        return float(value)

    def finished() -> int:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return len(study.get_trials(deepcopy=False, states=states))

    remaining = settings.n_trials - finished()
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=(MammogmicError,))
    return _export_top_k(study, out, settings.top_k, higher)


def _export_top_k(study: Any, out: Path, k: int, higher: bool) -> dict[str, Any]:
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    done.sort(key=lambda t: t.value, reverse=higher)
    folder = out / "top_k"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    exported = []
    for rank, trial in enumerate(done[:k], start=1):
        src = Path(trial.user_attrs["run_dir"]) / "best_model.safetensors"
        if not src.exists():
            logger.warning("trial %d has no best_model.safetensors; skipped", trial.number)
            continue
        dst = folder / f"rank{rank}_trial{trial.number:04d}.safetensors"
        shutil.copy2(src, dst)
        exported.append(
            {
                "rank": rank,
                "trial": trial.number,
                "value": trial.value,
                "lr": 10 ** trial.params["log10_lr"],
                "beta": 10 ** trial.params["log10_beta"],
                "percent_t": trial.params["percent_t"],
                "model": dst.name,
            }
        )
    (folder / "top_k.json").write_text(json.dumps(exported, indent=2) + "\n")
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    summary = {"trials": counts, "top_k": exported, "study": str(out / "study.db")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
