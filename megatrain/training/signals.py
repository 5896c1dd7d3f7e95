"""Stopping cleanly when the scheduler says so.

SIGTERM (torchrun, ``scancel``, a preemption) and SIGUSR1 (SLURM's ``--signal`` warning before
the time limit) only set a flag. At the next step boundary all ranks agree — a one-integer
all-reduce over a gloo group, so no GPU stream waits on it — and if any rank saw a signal,
every rank finishes the step, saves a checkpoint and exits with ``EXIT_REQUEUE``.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

from megatrain.distributed import host_all_reduce
from megatrain.errors import EXIT_REQUEUE, MegatrainError

log = logging.getLogger("megatrain")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(MegatrainError):
    """The run saved and stopped on a signal; the same command resumes it."""

    exit_code = EXIT_REQUEUE
    label = "stopped"


class StopSignals:
    """Records SIGTERM / SIGUSR1 and tells all ranks at once whether to stop."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank when any rank received a stop signal (a collective call)."""
        (flag,) = host_all_reduce([self.received or 0], "max")
        if flag and self.received is None:
            self.received = flag
        return bool(flag)

    def describe(self) -> str:
        return signal.Signals(self.received).name if self.received else "no signal"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
