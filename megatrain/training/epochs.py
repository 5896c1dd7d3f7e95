"""Training for a number of passes over the data (``trainer.epochs``) instead of a step count.

The stream reads every sample exactly ``epochs`` times and then ends; the trainer stops at the
step where no rank has data left (ranks agree over the host, see ``host_all_reduce``), and a rank
that ran out first joins the last steps with label-less copies of its last batch (zero weight:
``Trainer._token_weights``), as ZeRO's collectives need every rank in every step.

The schedule's length and the per-epoch eval/save steps come from the manifest's counts before
training starts (``steps_per_epoch``): exact for one sample per row, an estimate for packed rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatrain.data.stream.objectives import IGNORE
from megatrain.distributed import host_all_reduce
from megatrain.training.losses import LABEL_KEYS

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EpochPlan:
    epochs: int
    steps_per_epoch: float  # optimizer steps per pass (rank-local batches / grad_accum_steps)

    @property
    def max_steps(self) -> int:
        """The schedule's length: all epochs' steps."""
        return max(1, math.ceil(self.epochs * self.steps_per_epoch))

    def epoch_end(self, step: int) -> bool:
        """Whether ``step`` ends an epoch before the last (the last ends with the data)."""
        return any(step == max(1, round(k * self.steps_per_epoch)) for k in range(1, self.epochs))

    def epoch(self, step: int) -> float:
        """Epochs completed after ``step`` (fractional), for the log."""
        return round(step / self.steps_per_epoch, 3)


def blank(batch: Batch) -> Batch:
    """``batch`` with every label ignored: a zero-weight stand-in once this rank's data ended."""
    return {k: torch.full_like(v, IGNORE) if k in LABEL_KEYS else v for k, v in batch.items()}


class FiniteBatches:
    """A step's micro-batches from a stream that ends; None once it has ended on every rank."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        self.batches = batches
        self.filler: Batch | None = None

    def take(self, count: int) -> list[Batch] | None:
        got = [b for _, b in zip(range(count), self.batches, strict=False)]
        (any_left,) = host_all_reduce([len(got)], "max")
        if not any_left:
            return None
        if got:
            self.filler = blank(got[-1])
        if len(got) < count and self.filler is None:
            raise RuntimeError("this rank had no data at all while others still have some")
        return got + [self.filler] * (count - len(got))
