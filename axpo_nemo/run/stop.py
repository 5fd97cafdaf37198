"""Graceful stop on SIGTERM/SIGUSR1 (SLURM's time-limit and preemption signals) at a step boundary."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

__all__ = ["EXIT_STOPPED", "GracefulStop"]

logger = logging.getLogger(__name__)

#: Exit code after a stop signal: a checkpoint was written; run again to continue (EX_TEMPFAIL).
EXIT_STOPPED = 75


class GracefulStop:
    """Turn SIGTERM and SIGUSR1 into a stop request the training loop honours at a step boundary.

    Protocol::

        with GracefulStop() as stop:
            for step in range(start, total):
                train_step()
                if cfg.due(step) or stop.requested:
                    manager.save(step, state())
                if stop.requested:
                    log.info("stopping on %s after step %d", stop.signal_name, step)
                    break
        # exit normally: the next launch resumes with checkpoint.resume=auto

    Inside the block the signals only set ``requested`` (and ``signal_name``, e.g. ``'SIGTERM'``,
    the first one received); the step in flight finishes, a checkpoint is written, and the
    process exits normally (with a status the launcher understands as "stopped, resumable"). A
    repeated signal does not force an exit: SIGKILL does, and the previous checkpoint stays
    loadable. On exit the previous handlers are restored. SIGINT is left alone (Ctrl-C still
    interrupts).

    SLURM: ``#SBATCH --signal=USR1@300`` sends SIGUSR1 to the job steps 300 s before the time
    limit (with ``B:USR1@300`` only the batch shell gets it: launch with ``exec python ...``, or
    forward it). On preemption or ``scancel`` SLURM sends SIGTERM and, after ``KillWait``
    (30 s by default), SIGKILL: a step plus a save must fit, or the previous checkpoint is used.
    Combine with ``--requeue`` to continue automatically.

    Handlers can only be installed from the main thread; elsewhere a WARNING is logged and the
    signals keep their old behaviour.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signals = signals
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum, frame) -> None:
        # Only set flags: logging here could re-enter a handler lock the main thread holds.
        self.requested = True
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def request(self, reason: str = "request") -> None:
        """Ask for a stop programmatically (as if a signal named ``reason`` arrived)."""
        self.requested = True
        if self.signal_name is None:
            self.signal_name = reason

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("GracefulStop: not in the main thread; SIGTERM/SIGUSR1 handlers not installed")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
