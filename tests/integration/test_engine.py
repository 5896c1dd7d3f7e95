"""The DeepSpeed engine at full strength, on real processes (torchrun, gloo, DeepSpeed on CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.integration.helpers import TINY, env_for_tests, losses, metrics, run_module, train

pytestmark = pytest.mark.integration

STEPS = 30
ZERO = ("trainer.max_steps=30", "trainer.log_every=1", "trainer.eval_every=1000",
        "trainer.save_every=1000")


@pytest.fixture(scope="module")
def zero0_losses(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("zero0") / "run"
    train(run_dir, prepared_dir, *ZERO, "deepspeed=zero0", nproc=2)
    reference = losses(run_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))
    return reference


@pytest.mark.parametrize("option", ["zero1", "zero2", "zero3", "zero2-offload", "zero3-offload"])
def test_zero_stages_and_offload_match_stage_0(tmp_path: Path, prepared_dir: Path, option: str,
                                               zero0_losses: dict[int, float]) -> None:
    """2 ranks, fp32, 30 steps: every ZeRO stage (and CPU offload) logs stage 0's losses."""
    train(tmp_path / "run", prepared_dir, *ZERO, f"deepspeed={option}", nproc=2)
    got = losses(tmp_path / "run")
    for step, loss in zero0_losses.items():
        assert math.isclose(got[step], loss, rel_tol=1e-5), (step, loss, got[step])
    assert zero0_losses[STEPS] < zero0_losses[1] - 0.1  # they trained, not just agreed


# Impossible engine combinations: tests/integration/test_train.py (refused before anything
# is built).


def _rank_states(ckpt: Path) -> list[dict]:
    return [torch.load(ckpt / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


FAULTS = {"NAN": (5, "non-finite loss on 1 rank(s)"),
          # a finite loss with NaN gradients: our check (fp32 ZeRO-0), DeepSpeed's (the others)
          "GRAD_NAN": (8, "non-finite gradient norm")}


@pytest.mark.parametrize("option, faults", [
    ("deepspeed=zero0", ("NAN", "GRAD_NAN")),
    ("deepspeed=zero2", ("NAN", "GRAD_NAN")),
    ("deepspeed=zero3", ("GRAD_NAN",)),
    ("trainer.precision=bf16", ("GRAD_NAN",)),
])
def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path, prepared_dir: Path,
                                                      option: str, faults: tuple[str, ...]
                                                      ) -> None:
    """Each fault on rank 1 at its own step (a NaN loss at 5, NaN gradients at 8): every rank
    skips that update, says why, and counts it."""
    run_dir = tmp_path / "run"
    env = env_for_tests() | {f"MEGATRAIN_FAULT_{f}": f"{FAULTS[f][0]}:1" for f in faults}
    result = run_module("train", [*TINY, f"data.train={prepared_dir}", f"run.dir={run_dir}",
                                  "trainer.max_steps=12", "trainer.log_every=1",
                                  "trainer.save_every=12", "trainer.eval_every=1000",
                                  option], nproc=2, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = sorted(FAULTS[f][0] for f in faults)
    for fault in faults:
        step, message = FAULTS[fault]
        assert f"step {step}: {message}: the update is skipped on all" in result.stderr, \
            result.stderr[-3000:]
    logged = losses(run_dir)
    assert sorted(logged) == [s for s in range(1, 13) if s not in skipped]  # no loss for them
    assert all(math.isfinite(v) for v in logged.values()) and logged[12] < logged[1]
    rows = {r["step"]: r for r in metrics(run_dir) if "loss" in r}
    assert [rows[s + 1]["skipped_steps"] - rows[s - 1]["skipped_steps"] for s in skipped] == \
        [1] * len(skipped) and rows[skipped[0] - 1]["skipped_steps"] == 0
    states = _rank_states(run_dir / "checkpoints" / "step_12")
    assert states[0]["progress"]["skipped_steps"] == states[1]["progress"]["skipped_steps"] \
        == len(skipped)
    assert states[0]["weights_checksum"] == states[1]["weights_checksum"]  # replicas agree
    assert math.isfinite(states[0]["weights_checksum"])


def test_nan_every_step_stops_with_a_clear_error(tmp_path: Path, prepared_dir: Path) -> None:
    env = env_for_tests() | {"MEGATRAIN_FAULT_NAN": "3:0"}
    result = run_module("train", [*TINY, f"data.train={prepared_dir}",
                                  f"run.dir={tmp_path / 'run'}", "trainer.max_steps=12",
                                  "trainer.max_bad_steps=0"], env=env)
    assert result.returncode == 1
    assert "step 3: 1 bad steps in a row" in result.stderr, result.stderr[-2000:]


def test_loss_spike_rolls_back_to_the_last_checkpoint_and_skips_its_data(
        tmp_path: Path, prepared_dir: Path) -> None:
    run_dir = tmp_path / "run"
    env = env_for_tests() | {"MEGATRAIN_FAULT_SPIKE": "14"}  # loss × 20 at step 14, every rank
    result = run_module("train", [*TINY, f"data.train={prepared_dir}", f"run.dir={run_dir}",
                                  "trainer.max_steps=20", "trainer.log_every=1",
                                  "trainer.save_every=10", "trainer.eval_every=1000",
                                  "trainer.spike_policy=rollback", "trainer.spike_zscore=4"],
                        env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 14: loss spike" in result.stderr
    assert "step 14: rolled back to step_10 after a loss spike" in result.stderr
    rows = [r for r in metrics(run_dir) if "loss" in r]
    steps = [r["step"] for r in rows]
    # 1-13 trained; 14 spiked and was undone; the run went on from 10 with the data after 14:
    # its rows of 11-13 moved aside, one row per step stays
    assert steps == list(range(1, 21))
    aside = [json.loads(line) for line in (run_dir / "metrics.abandoned.jsonl").open()]
    assert [(r["step"], r["reason"]) for r in aside] == [(s, "rollback") for s in range(11, 14)]
    assert rows[-1]["rollbacks"] == 1 and all(math.isfinite(r["loss"]) for r in rows)
    state = torch.load(run_dir / "checkpoints" / "step_20" / "rank0.pt", weights_only=False)
    assert state["progress"]["rollbacks"] == 1
