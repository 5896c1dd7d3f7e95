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


@dataclass
class FaultInjection:
    """Faults the fault-injection tests switch on through the environment; never set otherwise.

    ``MEGATRAIN_FAULT_NAN=STEP:RANK`` makes that rank's loss NaN at that step;
    ``MEGATRAIN_FAULT_GRAD_NAN=STEP:RANK`` leaves that rank's loss as it is but makes its
    gradients NaN; ``MEGATRAIN_FAULT_SPIKE=STEP`` multiplies every rank's loss by 20 the first
    time that step runs (a finite spike that a rollback leaves behind, as skipping bad data
    would); ``MEGATRAIN_FAULT_SAVE_DELAY=SECONDS`` holds every save that long between writing
    and publishing, so a test's SIGKILL can land mid-save.
    """

    nan_at: tuple[int, int] | None = None
    grad_nan_at: tuple[int, int] | None = None
    save_delay_s: float = 0.0
    spike_step: int | None = None

    @classmethod
    def from_env(cls) -> FaultInjection:
        nan = os.environ.get("MEGATRAIN_FAULT_NAN")
        grad_nan = os.environ.get("MEGATRAIN_FAULT_GRAD_NAN")
        delay = float(os.environ.get("MEGATRAIN_FAULT_SAVE_DELAY", "0"))
        spike = os.environ.get("MEGATRAIN_FAULT_SPIKE")
        if nan or grad_nan or delay or spike:
            log.warning("fault injection is on: nan=%s grad_nan=%s spike=%s save_delay=%ss",
                        nan, grad_nan, spike, delay)
        return cls(_step_rank(nan), _step_rank(grad_nan), delay, int(spike) if spike else None)

    def poison(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        """``loss``, made NaN, given NaN gradients or spiked where the test asked for it."""
        if (step, rank) == self.nan_at:
            return loss * float("nan")
        if (step, rank) == self.grad_nan_at:
            # The value is exactly ``loss``; the gradient is 1 + 0·∞ = NaN everywhere.
            return loss + 0.0 * torch.sqrt(loss * 0.0)
        if step == self.spike_step:
            self.spike_step = None
            return loss * 20.0
        return loss


def _step_rank(value: str | None) -> tuple[int, int] | None:
    """``"STEP:RANK"`` → (step, rank)."""
    if not value:
        return None
    step, rank = value.split(":")
    return int(step), int(rank)
