"""Stopping a training run cleanly on Ctrl-C, a scheduler's preemption signal or its advance warning.

:class:`StopSignals` turns the first SIGINT, SIGTERM or SIGUSR1 into a request that the trainer honours after the
current optimizer step: it writes ``last.pt`` and raises :class:`TrainingInterrupted`. A second signal raises
``KeyboardInterrupt`` at once (abort without saving). Handlers are installed only in the main thread (the only
one Python delivers signals to) and the previous ones are put back on exit, so the trainer behaves the same as a
library, inside ``mammogmic tune`` and in a test.

SLURM, for one, sends SIGTERM to every process of a job step when it preempts or cancels it (and SIGUSR1 ahead of
the time limit with ``--signal=USR1@120``); ``torchrun`` forwards SIGINT/SIGTERM to its workers. DataLoader
workers ignore the three signals (:func:`ignore_stop_signals`), so they keep serving the main process, which
decides when to stop and shuts them down.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["STOP_SIGNALS", "StopSignals", "TrainingInterrupted", "ignore_stop_signals"]

logger = logging.getLogger(__name__)

#: The signals that stop a run after the current optimizer step (SIGUSR1 does not exist on Windows).
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


class TrainingInterrupted(KeyboardInterrupt):
    """A stop signal ended training after an optimizer step whose state is saved in ``checkpoint``.

    A ``KeyboardInterrupt`` so that code which already handles Ctrl-C (``mammogmic tune`` marks its trial for
    resumption) keeps working.

    Attributes:
        signal_name: ``"SIGINT"``, ``"SIGTERM"`` or ``"SIGUSR1"``.
        signum: the signal number (``mammogmic train`` exits with ``128 + signum``).
        checkpoint: the ``last.pt`` that was written.
        global_step: optimizer steps done (the checkpoint's step).
    """

    def __init__(self, message: str, *, signum: int, checkpoint: Any, global_step: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.checkpoint = checkpoint
        self.global_step = global_step


def ignore_stop_signals() -> None:
    """Make this process (a DataLoader worker) ignore the stop signals; its parent handles them."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """Context manager recording the first stop signal; a second one raises ``KeyboardInterrupt`` immediately.

    Outside the main thread nothing is installed and :attr:`signum` stays ``None`` (the caller's own handlers,
    if any, keep working).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, previous in self._previous.items():
            # ``None``: the previous handler was not installed from Python; the default is the closest.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise KeyboardInterrupt(f"second stop signal ({name}): aborted at once, nothing saved")
        self.signum = signum
        logger.warning(
            "%s received: stopping after the current optimizer step and saving last.pt "
            "(send it again to abort at once without saving)",
            name,
        )
