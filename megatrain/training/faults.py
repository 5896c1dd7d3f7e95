"""Stopping cleanly when the scheduler says so, and the faults tests inject.

SIGTERM (torchrun, ``scancel``, a preemption) and SIGUSR1 (SLURM's ``--signal`` warning before
the time limit) only set a flag. At the next step boundary all ranks agree — a one-integer
all-reduce over a gloo group, so no GPU stream waits on it — and if any rank saw a signal,
every rank finishes the step, saves a checkpoint and exits with ``EXIT_REQUEUE``.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from types import FrameType

import torch
import torch.distributed as dist

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
        self._group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            cpu = dist.get_backend() == "gloo"
            self._group = None if cpu else dist.new_group(backend="gloo")
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank when any rank received a stop signal (a collective call)."""
        flag = torch.tensor([0 if self.received is None else self.received], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.received is None:
            self.received = int(flag.item())
        return bool(flag.item())

    def describe(self) -> str:
        return signal.Signals(self.received).name if self.received else "no signal"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class FaultInjection:
    """Faults the fault-injection tests switch on through the environment; never set otherwise.

    ``MEGATRAIN_FAULT_NAN=STEP:RANK`` makes that rank's loss NaN at that step;
    ``MEGATRAIN_FAULT_SAVE_DELAY=SECONDS`` holds every save that long between writing and
    publishing, so a test's SIGKILL can land mid-save.
    """

    nan_step: int | None = None
    nan_rank: int | None = None
    save_delay_s: float = 0.0

    @classmethod
    def from_env(cls) -> FaultInjection:
        nan = os.environ.get("MEGATRAIN_FAULT_NAN")
        step, rank = (int(x) for x in nan.split(":")) if nan else (None, None)
        delay = float(os.environ.get("MEGATRAIN_FAULT_SAVE_DELAY", "0"))
        if nan or delay:
            log.warning("fault injection is on: nan=%s save_delay=%ss", nan, delay)
        return cls(step, rank, delay)

    def poison(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        """``loss``, made NaN where the test asked for it."""
        if step == self.nan_step and rank == self.nan_rank:
            return loss * float("nan")
        return loss
