"""Numerical faults: non-finite losses skip a step on every rank; loss spikes log or roll back.

Once per optimizer step, before the update, every rank contributes its loss to one all-reduce of
``[loss sum, non-finite count]`` and reads the result back: the one host–device sync this adds
per step (``trainer.skip_nonfinite=false`` removes it). A non-finite loss on any rank makes every
rank skip the update identically (the optimizer step is a no-op; the LR schedule still advances).
Non-finite gradients with a finite loss: DeepSpeed's own check catches them under ZeRO 1-3 and
bf16/fp16 (it takes the global gradient norm and skips the step on every rank; the schedule does
not advance then), and the trainer counts that skip; plain fp32 ZeRO-0 has no such check, so there
the gradient norm joins the all-reduce above.
A finite loss whose z-score over the last ``trainer.spike_window`` steps exceeds
``trainer.spike_zscore`` is a spike: ``spike_policy=log`` warns, ``rollback`` reloads the last
checkpoint and goes on with the data after the spike (the batches in between are skipped).
``trainer.max_bad_steps`` bad steps in a row stop the run with an error.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatrain.config.schema import TrainerConfig
from megatrain.errors import ConfigError, MegatrainError

log = logging.getLogger("megatrain")
SPIKE_POLICIES = ("off", "log", "rollback")
MIN_HISTORY = 10  # steps of history before a z-score means anything


class Diverged(MegatrainError):
    """Too many bad steps in a row: retrying the same run would fail the same way."""


@dataclass(frozen=True)
class Verdict:
    """What to do with this step's update."""

    loss: float  # the mean loss over ranks (nan when a rank's loss was not finite)
    skip: bool = False  # a non-finite loss on some rank: skip the update
    spike: bool = False  # a finite loss far above the recent ones


class StepGuard:
    """Agrees across ranks on each step's loss, and keeps the history spikes are judged on."""

    def __init__(self, trainer_cfg: TrainerConfig, world_size: int) -> None:
        if trainer_cfg.spike_policy not in SPIKE_POLICIES:
            raise ConfigError(f"trainer.spike_policy={trainer_cfg.spike_policy} is not one of "
                              f"{', '.join(SPIKE_POLICIES)}")
        self.policy = trainer_cfg.spike_policy
        self.zscore = trainer_cfg.spike_zscore
        self.max_bad = trainer_cfg.max_bad_steps
        self.world_size = world_size
        self.history: deque[float] = deque(maxlen=trainer_cfg.spike_window)
        self.bad_in_a_row = 0

    def check(self, loss: torch.Tensor, step: int,
              grad_norm: torch.Tensor | None = None) -> Verdict:
        """The verdict on ``loss`` (this rank's mean loss of the step, on the device) and, where
        DeepSpeed does not check the gradients itself, on their norm (see ``Trainer``)."""
        loss = loss.detach().float()
        grads_bad = (~torch.isfinite(grad_norm)).float() if grad_norm is not None \
            else torch.zeros((), device=loss.device)
        packed = torch.stack([torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0),
                              (~torch.isfinite(loss)).float(), grads_bad.to(loss.device)])
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(packed)
        loss_sum, bad_losses, bad_grads = packed.tolist()
        if bad_losses or bad_grads:
            verdict = Verdict(math.nan, skip=True)
            what = f"non-finite loss on {int(bad_losses)} rank(s)" if bad_losses \
                else "non-finite gradient norm"
            log.warning("step %d: %s: the update is skipped on all", step, what)
        else:
            mean = loss_sum / self.world_size
            verdict = Verdict(mean, spike=self._is_spike(mean))
        return verdict

    def settle(self, verdict: Verdict, step: int) -> None:
        """Record the step's final verdict, after the update: ``check``'s, or a skip DeepSpeed's
        own gradient check made in between. A good step's loss joins the spike history; bad
        steps in a row past ``max_bad_steps`` raise Diverged."""
        if not verdict.skip and not verdict.spike:
            self.history.append(verdict.loss)
        self._count(verdict, step)

    def _is_spike(self, loss: float) -> bool:
        spike = False
        if self.policy != "off" and len(self.history) >= MIN_HISTORY:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            spike = loss > mean and (loss - mean) > self.zscore * max(std, 1e-6)
        return spike

    def _count(self, verdict: Verdict, step: int) -> None:
        bad = verdict.skip or (verdict.spike and self.policy == "rollback")
        self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0
        if self.bad_in_a_row > self.max_bad:
            raise Diverged(f"step {step}: {self.bad_in_a_row} bad steps in a row (non-finite "
                           f"losses or loss spikes; trainer.max_bad_steps={self.max_bad}): lower "
                           "optim.lr, check the data, or resume from an earlier checkpoint")
