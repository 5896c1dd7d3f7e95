"""StepGuard's bookkeeping on one process: what counts as bad, and when a run is given up."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megatrain.training.numerics import Diverged, StepGuard, Verdict


def _guard(max_bad_steps: int = 3, policy: str = "log") -> StepGuard:
    cfg = SimpleNamespace(spike_policy=policy, spike_zscore=6.0, spike_window=50,
                          max_bad_steps=max_bad_steps)
    return StepGuard(cfg, world_size=1)


def test_steps_deepspeed_skips_after_a_finite_loss_add_up_to_diverged() -> None:
    """A finite loss passes ``check``; DeepSpeed's gradient check then skips the update. Those
    steps are bad in a row like NaN losses, and their losses stay out of the spike history."""
    guard = _guard(max_bad_steps=3)
    for step in range(1, 4):
        assert not guard.check(torch.tensor(2.0), step).skip
        guard.settle(Verdict(math.nan, skip=True), step)
    assert guard.bad_in_a_row == 3 and not guard.history
    guard.check(torch.tensor(2.0), 4)
    with pytest.raises(Diverged, match="step 4: 4 bad steps in a row"):
        guard.settle(Verdict(math.nan, skip=True), 4)


def test_a_good_step_resets_the_count_and_joins_the_history() -> None:
    guard = _guard(max_bad_steps=1)
    guard.settle(guard.check(torch.tensor(float("nan")), 1), 1)
    assert guard.bad_in_a_row == 1
    good = guard.check(torch.tensor(3.0), 2)
    guard.settle(good, 2)
    assert guard.bad_in_a_row == 0 and list(guard.history) == [3.0]


def test_a_spike_is_judged_against_good_steps_only() -> None:
    guard = _guard(policy="rollback")
    for step in range(1, 21):
        guard.settle(guard.check(torch.tensor(2.0 + 0.01 * (step % 3)), step), step)
    spike = guard.check(torch.tensor(50.0), 21)
    assert spike.spike
    guard.settle(spike, 21)
    assert 50.0 not in guard.history and guard.bad_in_a_row == 1
