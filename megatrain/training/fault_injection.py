"""Faults the fault-injection tests switch on through the environment (never set otherwise)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("megatrain")


@dataclass
class FaultInjection:
    """Faults the fault-injection tests switch on through the environment; never set otherwise.

    ``MEGATRAIN_FAULT_NAN=STEP:RANK`` makes that rank's loss NaN at that step;
    ``MEGATRAIN_FAULT_GRAD_NAN=STEP:RANK`` leaves that rank's loss as it is but makes its
    gradients NaN; ``MEGATRAIN_FAULT_SPIKE=STEP`` multiplies every rank's loss by 20 the first
    time that step runs (a finite spike that a rollback leaves behind, as skipping bad data
    would); ``MEGATRAIN_FAULT_SAVE_DELAY=SECONDS`` holds every save that long between writing
    and publishing, so a test's SIGKILL can land mid-save; ``MEGATRAIN_FAULT_PREEMPT=STEP``
    acts as if a stop signal arrived during that step (a preemption at an exact step).
    """

    nan_at: tuple[int, int] | None = None
    grad_nan_at: tuple[int, int] | None = None
    save_delay_s: float = 0.0
    spike_step: int | None = None
    preempt_step: int | None = None

    @classmethod
    def from_env(cls) -> FaultInjection:
        nan = os.environ.get("MEGATRAIN_FAULT_NAN")
        grad_nan = os.environ.get("MEGATRAIN_FAULT_GRAD_NAN")
        delay = float(os.environ.get("MEGATRAIN_FAULT_SAVE_DELAY", "0"))
        spike = os.environ.get("MEGATRAIN_FAULT_SPIKE")
        preempt = os.environ.get("MEGATRAIN_FAULT_PREEMPT")
        if nan or grad_nan or delay or spike or preempt:
            log.warning("fault injection is on: nan=%s grad_nan=%s spike=%s save_delay=%ss "
                        "preempt=%s", nan, grad_nan, spike, delay, preempt)
        return cls(_step_rank(nan), _step_rank(grad_nan), delay, int(spike) if spike else None,
                   int(preempt) if preempt else None)

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
