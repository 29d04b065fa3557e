"""Random hyper-parameter search (the paper's procedure) with Optuna and a SQLite study that survives kills.

Search space (paper): ``lr ~ 10^U[-5.5, -4]``, ``beta ~ 10^U[-5.5, -3.5]``, ``t`` from a set. Each trial trains a
full run into ``OUT/trials/trial_NNNN`` and reports its best validation metric. The study lives in
``OUT/study.db``; rerunning the same command continues it until ``n_trials`` trials have finished.

Continuing a study must not repeat it. Optuna's ``RandomSampler(seed)`` restarts its random stream in every
process, so a second process drew trial 0's parameters again for its first trial. Here each trial's draw
depends only on ``(study seed, trial number)`` (:class:`TrialSeededSampler`), and a draw that equals a
parameter set already in the study is drawn again: a search continued over any number of processes tries the
same points as one long run, and never one twice.

Interrupted trials are resumed, not repeated: a trial stopped by Ctrl-C (``KeyboardInterrupt``) is marked
``interrupted`` before the process stops, and one left ``RUNNING`` by a killed process is failed; the next run
queues either again with the same parameters, and the retry continues the trial's run folder from its
``last.pt`` (so one search folder must be driven by one process at a time). At the end the ``top_k`` best
distinct models are copied to ``OUT/top_k/`` (``rank1_trialNNNN.safetensors``...) with ``OUT/top_k/top_k.json``.

Paths stored in the study (``run_dir``) and written to ``OUT/summary.json`` are relative to ``OUT``, those in
``top_k.json`` to its own folder, so a search folder can be moved or copied whole.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mammogmic._extras import missing_extra

try:
    import optuna
    from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
    from optuna.trial import FrozenTrial, TrialState
except ImportError as _exc:
    raise missing_extra("optuna", "mammogmic tune (the hyper-parameter search)", _exc) from _exc

from mammogmic._json import write_json
from mammogmic.data.cache import sha256_file
from mammogmic.errors import ConfigError, MammogmicError
from mammogmic.training.config import TrainConfig
from mammogmic.training.loop import NonFiniteLossError, Trainer

__all__ = ["TrialSeededSampler", "TuneSettings", "search_space", "tune"]

logger = logging.getLogger(__name__)

STUDY_NAME = "gmic"
PARAM_NAMES = ("log10_lr", "log10_beta", "percent_t")


@dataclass(frozen=True)
class TuneSettings:
    """Search settings.

    Attributes:
        n_trials: total finished trials wanted (finished = complete or failed with a non-finite loss).
        lr_log10: log10 range of the learning rate.
        beta_log10: log10 range of beta.
        t_choices: candidate t values of top-t% pooling.
        top_k: models exported for ensembling.
        seed: seed of the search; a study keeps the seed it was started with.
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
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")


def search_space(settings: TuneSettings) -> dict[str, BaseDistribution]:
    """The Optuna distributions of one trial's parameters (``log10_lr``, ``log10_beta``, ``percent_t``)."""
    return {
        "log10_lr": FloatDistribution(*settings.lr_log10),
        "log10_beta": FloatDistribution(*settings.beta_log10),
        "percent_t": CategoricalDistribution(list(settings.t_choices)),
    }


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Random search whose draws depend only on ``(seed, trial number)``, never repeating a parameter set.

    The whole parameter set of a trial is drawn at once (Optuna's "relative" sampling) from
    ``numpy.random.default_rng([seed, trial number, attempt])``. If it equals the parameters of any trial already
    in the study (finished, failed or queued), ``attempt`` is increased and the set drawn again. A new process
    therefore continues the sequence where the study stands instead of starting it over, and the result does not
    depend on how the trials were split across processes. Queued trials (``study.enqueue_trial``, used to retry
    interrupted trials) keep their fixed parameters: repeating those is asked for.

    Args:
        space: the parameter distributions (:func:`search_space`).
        seed: the study's seed.
        max_attempts: draws per trial before giving up (only a tiny discrete space can run out).
    """

    def __init__(self, space: Mapping[str, BaseDistribution], seed: int, *, max_attempts: int = 1000) -> None:
        self.space = dict(space)
        self.seed = seed
        self.max_attempts = max_attempts

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return dict(self.space)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        names = sorted(search_space)
        tried = _tried_parameter_sets(study, names, exclude=trial.number)
        for attempt in range(self.max_attempts):
            rng = np.random.default_rng([self.seed, trial.number, attempt])
            params = {name: _draw(rng, search_space[name], name) for name in names}
            if _key(params, names) not in tried:
                if attempt:
                    logger.info(
                        "trial %d: draw %d repeated an earlier trial; drawn again", trial.number, attempt
                    )
                return params
        raise MammogmicError(
            f"search space exhausted: {self.max_attempts} draws for trial {trial.number} all repeat one of the "
            f"study's {len(tried)} parameter sets; widen the ranges or add t choices"
        )

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        # A parameter outside the declared space: still a function of (seed, trial number, name) only.
        salt = int.from_bytes(hashlib.sha256(param_name.encode("utf-8")).digest()[:4], "little")
        rng = np.random.default_rng([self.seed, trial.number, 1 << 20, salt])
        return _draw(rng, param_distribution, param_name)


def _draw(rng: np.random.Generator, distribution: BaseDistribution, name: str) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[int(rng.integers(len(distribution.choices)))]
    if isinstance(distribution, FloatDistribution) and distribution.step is None:
        low, high = distribution.low, distribution.high
        if distribution.log:
            return float(math.exp(rng.uniform(math.log(low), math.log(high))))
        return float(rng.uniform(low, high))
    raise NotImplementedError(f"{name}: TrialSeededSampler draws categorical and continuous floats only")


def _key(params: Mapping[str, Any], names: Sequence[str]) -> tuple[Any, ...]:
    return tuple(params[n] for n in names)


def _tried_parameter_sets(
    study: optuna.Study, names: Sequence[str], exclude: int | None = None
) -> set[tuple]:
    """Parameter sets of every trial in the study, including the fixed ones of queued trials."""
    tried: set[tuple[Any, ...]] = set()
    for t in study.get_trials(deepcopy=False):
        if t.number == exclude:
            continue
        params = t.params if t.state != TrialState.WAITING else t.system_attrs.get("fixed_params", {})
        if all(n in params for n in names):
            tried.add(_key(params, names))
    return tried


def tune(
    config: TrainConfig,
    out_dir: str | Path,
    settings: TuneSettings = TuneSettings(),
    *,
    callback: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or continue) the search; return a summary (also written to ``OUT/summary.json``).

    Raises:
        ConfigError: ``settings.seed`` differs from the seed the study in ``out_dir`` was started with.
        KeyboardInterrupt: Ctrl-C; the running trial is marked and resumed by the next call.
    """
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    higher = config.schedule.val_metric != "val_loss"
    space = search_space(settings)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        load_if_exists=True,
        direction="maximize" if higher else "minimize",
        sampler=TrialSeededSampler(space, settings.seed),
    )
    started_with = study.user_attrs.get("seed")
    if started_with is None:
        study.set_user_attr("seed", settings.seed)
    elif started_with != settings.seed:
        raise ConfigError(
            f"seed: the study in {out} was started with seed {started_with}, got {settings.seed}; continue it "
            f"with --seed {started_with} or start a new search in another --out"
        )
    study.set_user_attr("base_config", config.to_dict())
    _requeue_interrupted(study)

    def objective(trial: optuna.Trial) -> float:
        lr = 10 ** trial.suggest_float("log10_lr", *settings.lr_log10)
        beta = 10 ** trial.suggest_float("log10_beta", *settings.beta_log10)
        t = trial.suggest_categorical("percent_t", list(settings.t_choices))
        resume_from = trial.user_attrs.get("resume_from")
        run_rel = resume_from or f"trials/trial_{trial.number:04d}"
        run = out / run_rel  # an absolute path (older studies stored those) stays as it is
        trial.set_user_attr("run_dir", run_rel)
        resume = (run / "last.pt").exists()
        if resume_from and not resume and run.exists():
            shutil.rmtree(run)  # stopped before its first checkpoint: start clean, no duplicated log rows
        cfg = config.replace(**{"optim.lr": lr, "loss.beta": beta, "model.percent_t": float(t)})
        logger.info(
            "trial %d: lr=%.3g beta=%.3g t=%s%s", trial.number, lr, beta, t, " (resumed)" if resume else ""
        )
        try:
            result = Trainer(cfg, run, callback=callback).fit(resume=resume)
        except KeyboardInterrupt:
            # Optuna marks the trial FAIL and re-raises; the mark makes the next run queue it again.
            trial.set_user_attr("interrupted", True)
            logger.warning(
                "trial %d interrupted; rerun the same command to resume it from %s",
                trial.number,
                run / "last.pt",
            )
            raise
        except NonFiniteLossError as exc:
            trial.set_user_attr("error", str(exc))
            raise optuna.TrialPruned(str(exc)) from exc
        except MammogmicError as exc:
            trial.set_user_attr("error", str(exc))
            raise
        value = result.best_metric
        if value is None or not math.isfinite(value):
            raise optuna.TrialPruned("no finite validation metric")
        trial.set_user_attr("best_epoch", result.best_epoch)
        return float(value)

    states = (TrialState.COMPLETE, TrialState.PRUNED)
    remaining = settings.n_trials - len(study.get_trials(deepcopy=False, states=states))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=(MammogmicError,))
    return _export_top_k(study, out, settings.top_k, higher)


def _requeue_interrupted(study: optuna.Study) -> None:
    """Queue again, with the same parameters and run folder, every trial stopped by a kill or Ctrl-C.

    A trial left ``RUNNING`` can only come from a process that died (one process per search folder): it is failed
    first. A trial is retried once: the retry records ``retry_of``, and an interrupted retry is retried in turn.
    """
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for old in trials:
        if old.state == TrialState.RUNNING:
            study.tell(old.number, state=TrialState.FAIL)
            how = "its process was killed"
        elif old.state == TrialState.FAIL and old.user_attrs.get("interrupted"):
            how = "it was interrupted"
        else:
            continue
        if old.number in retried or not old.params:  # already queued, or stopped before drawing anything
            continue
        attrs: dict[str, Any] = {"retry_of": old.number}
        if old.user_attrs.get("run_dir"):
            attrs["resume_from"] = old.user_attrs["run_dir"]
        study.enqueue_trial(dict(old.params), user_attrs=attrs)
        logger.info("trial %d: %s; queued again (resuming %s)", old.number, how, attrs.get("resume_from"))


def _export_top_k(study: optuna.Study, out: Path, k: int, higher: bool) -> dict[str, Any]:
    """Copy the ``k`` best *distinct* models (parameter set, run folder and weights) to ``OUT/top_k``."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    done.sort(key=lambda t: (-float(t.value) if higher else float(t.value), t.number))  # type: ignore[arg-type]
    folder = out / "top_k"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    seen: dict[str, int] = {}  # params / run folder / weights digest -> first trial that had it
    exported: list[dict[str, Any]] = []
    for trial in done:
        if len(exported) == k:
            break
        run = out / trial.user_attrs["run_dir"]
        src = run / "best_model.safetensors"
        if not src.exists():
            logger.warning("trial %d has no best_model.safetensors; skipped", trial.number)
            continue
        digest = sha256_file(src)
        keys = [f"params:{_key(trial.params, PARAM_NAMES)}", f"run:{run.resolve()}", f"weights:{digest}"]
        twin = next((seen[key] for key in keys if key in seen), None)
        if twin is not None:
            logger.warning(
                "trial %d repeats trial %d (same parameters, folder or weights); skipped", trial.number, twin
            )
            continue
        seen.update(dict.fromkeys(keys, trial.number))
        dst = folder / f"rank{len(exported) + 1}_trial{trial.number:04d}.safetensors"
        shutil.copy2(src, dst)
        exported.append(
            {
                "rank": len(exported) + 1,
                "trial": trial.number,
                "value": trial.value,
                "lr": 10 ** trial.params["log10_lr"],
                "beta": 10 ** trial.params["log10_beta"],
                "percent_t": trial.params["percent_t"],
                "model": dst.name,  # relative to top_k.json's folder
                "sha256": digest,
            }
        )
    write_json(folder / "top_k.json", exported)
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    summary = {
        "trials": counts,
        "top_k": [{**e, "model": f"top_k/{e['model']}"} for e in exported],  # relative to OUT
        "study": "study.db",
    }
    write_json(out / "summary.json", summary)
    return summary
