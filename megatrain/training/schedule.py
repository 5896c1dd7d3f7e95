"""Learning-rate schedules as a multiplier of the peak LR (for ``LambdaLR``).

Warmup is linear from 0; then ``cosine`` / ``linear`` decay to ``min_lr_ratio`` at
``total_steps``, ``wsd`` (warmup-stable-decay) holds the peak and decays linearly over the last
``wsd_decay_fraction`` of the run, ``constant`` holds the peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from megatrain.errors import ConfigError

if TYPE_CHECKING:
    from megatrain.config.schema import Config

DECAYS = ("cosine", "linear", "wsd", "constant")


def lr_multiplier(
    decay: str, warmup_steps: int, total_steps: int, min_lr_ratio: float,
    wsd_decay_fraction: float = 0.2,
) -> Callable[[int], float]:
    """Return ``step -> multiplier`` (step counts optimizer updates from 0)."""
    if decay not in DECAYS:
        raise ConfigError(f"schedule.decay={decay!r} is not one of {', '.join(DECAYS)}")
    if total_steps <= warmup_steps and decay != "constant":
        raise ConfigError(
            f"schedule: total steps ({total_steps}, trainer.max_steps unless schedule.total_steps "
            f"is set) must exceed schedule.warmup_steps ({warmup_steps}): lower the warmup")
    decay_start = (total_steps - int(wsd_decay_fraction * total_steps)
                   if decay == "wsd" else warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant" or step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return multiplier


def lr_multiplier_of(cfg: Config) -> Callable[[int], float]:
    """``lr_multiplier`` of a run's config (``schedule.total_steps`` defaults to the run's
    ``trainer.max_steps``)."""
    s = cfg.schedule
    return lr_multiplier(s.decay, s.warmup_steps, s.total_steps or cfg.trainer.max_steps,
                         s.min_lr_ratio, s.wsd_decay_fraction)
