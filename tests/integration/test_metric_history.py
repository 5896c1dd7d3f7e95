"""One metric history per run, on real runs with W&B offline: after a SIGKILL and a resume from
a checkpoint 10 steps back, and after a loss-spike rollback, ``metrics.jsonl`` and the W&B
history (read back from W&B's own transaction logs, what ``wandb sync`` uploads) hold each step
once, the surviving timeline's — also across a SIGTERM and requeue."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from megatrain.errors import EXIT_REQUEUE
from megatrain.metrics import wandb_log
from tests.integration.helpers import REPO, TINY, env_for_tests, losses, metrics, module_command

pytestmark = pytest.mark.integration

RUN = ("trainer.max_steps=20", "schedule.total_steps=20", "trainer.log_every=1",
       "trainer.save_every=10", "trainer.eval_every=1000", "trainer.keep_last=5",
       "logger.wandb.mode=offline")


def _args(run_dir: Path, data_dir: Path, *overrides: str) -> list[str]:
    return module_command("train", [*TINY, f"data.train={data_dir}", f"run.dir={run_dir}", *RUN,
                                    *overrides])


def _train(run_dir: Path, data_dir: Path, *overrides: str, env: dict | None = None,
           code: int = 0) -> str:
    result = subprocess.run(_args(run_dir, data_dir, *overrides), cwd=REPO,
                            env=env or env_for_tests(), capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == code, result.stderr[-3000:]
    return result.stderr


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    tree = psutil.Process(proc.pid)
    for process in [tree, *tree.children(recursive=True)]:  # wandb-core too
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    proc.wait()


def _run_id(run_dir: Path, step: int) -> str:
    """The W&B run the checkpoint of ``step`` names."""
    path = run_dir / "checkpoints" / f"step_{step}" / "rank0.pt"
    return torch.load(path, weights_only=False)["wandb_run_id"]


def _wandb_losses(run_dir: Path) -> dict[int, float]:
    """The training losses of the W&B run the final checkpoint names, each step once."""
    rows = [r for r in wandb_log.run_history(run_dir / "wandb", _run_id(run_dir, 20))
            if "loss" in r]
    steps = [r["_step"] for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice to W&B: {steps}"
    return {r["_step"]: r["loss"] for r in rows}


def _abandoned(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.abandoned.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


def _one_row_per_step(run_dir: Path) -> dict[int, float]:
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, 21)), steps
    return losses(run_dir)


def test_sigkill_and_resume_from_ten_steps_back(tmp_path: Path, prepared_dir: Path) -> None:
    run_dir = tmp_path / "run"
    # Killed while saving step 20, the last (held 2 s before it is published): the rows of
    # steps 1-20 are in metrics.jsonl and W&B was sent steps 1-10; the newest checkpoint is 10.
    proc = subprocess.Popen(_args(run_dir, prepared_dir), cwd=REPO,
                            env=env_for_tests() | {"MEGATRAIN_FAULT_SAVE_DELAY": "2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 60
    while not (run_dir / "checkpoints" / "step_20.tmp").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "never saved step 20"
        time.sleep(0.02)
    _kill_tree(proc)
    uninterrupted = _one_row_per_step(run_dir)  # that attempt ran steps 1-20 without a break
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_10"

    stderr = _train(run_dir, prepared_dir)
    assert "at step 10" in stderr
    assert _one_row_per_step(run_dir) == uninterrupted
    assert _wandb_losses(run_dir) == uninterrupted
    aside = [(r["step"], r["loss"], r["reason"]) for r in _abandoned(run_dir)]
    assert aside == [(s, uninterrupted[s], "resume") for s in range(11, 21)]


def test_spike_rollback_then_a_requeue_leaves_the_surviving_rows_in_both(
        tmp_path: Path, prepared_dir: Path) -> None:
    run_dir = tmp_path / "run"
    # loss × 20 at step 14 (rolled back to step 10), then a SIGTERM at step 17 (save, exit 75)
    env = env_for_tests() | {"MEGATRAIN_FAULT_SPIKE": "14", "MEGATRAIN_FAULT_PREEMPT": "17"}
    stderr = _train(run_dir, prepared_dir, "trainer.spike_policy=rollback",
                    "trainer.spike_zscore=4", env=env, code=EXIT_REQUEUE)
    assert "step 14: rolled back to step_10" in stderr
    stopped_in = _run_id(run_dir, 17)
    _train(run_dir, prepared_dir, "trainer.spike_policy=rollback", "trainer.spike_zscore=4")
    jsonl = _one_row_per_step(run_dir)
    assert _wandb_losses(run_dir) == jsonl
    assert _run_id(run_dir, 20) == stopped_in  # the requeued run continued the same W&B run
    aside = [(r["step"], r["reason"]) for r in _abandoned(run_dir)]
    assert aside == [(s, "rollback") for s in range(11, 14)]  # the abandoned timeline's rows
