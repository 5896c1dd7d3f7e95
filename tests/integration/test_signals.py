"""SIGTERM / SIGUSR1: every rank finishes the step, saves, exits "requeue me"; the rerun continues
exactly where an uninterrupted run would be."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.helpers import (
    REPO,
    TINY,
    env_for_tests,
    last_step,
    losses,
    module_command,
    train,
)

pytestmark = pytest.mark.integration
STEPS = ("trainer.max_steps=60", "trainer.log_every=1", "trainer.save_every=1000",
         "trainer.eval_every=1000", "schedule.total_steps=60")


def _start(run_dir: Path, data_dir: Path) -> subprocess.Popen[str]:
    args = [*TINY, f"data.train={data_dir}", f"run.dir={run_dir}", *STEPS]
    return subprocess.Popen(module_command("train", args, nproc=2), cwd=REPO,
                            env=env_for_tests(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if last_step(run_dir) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"never reached step {step}: {proc.communicate()[1][-3000:]}")


def _rank_pids(torchrun_pid: int) -> list[int]:
    return sorted(child.pid for child in psutil.Process(torchrun_pid).children())


def test_signal_saves_stops_and_resumes_exactly(tmp_path: Path, prepared_dir: Path) -> None:
    """torchrun, 2 ranks, SIGUSR1 to rank 1 only: rank 0 must still agree. (One process and
    SIGTERM: tests/integration/test_faults.py, five of them, bit-identical.)"""
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    train(reference, prepared_dir, *STEPS, nproc=2)

    proc = _start(stopped, prepared_dir)
    _wait_for_step(stopped, 10, proc)
    time.sleep(0.3)
    subprocess.run(["kill", "-USR1", str(_rank_pids(proc.pid)[-1])], check=True)
    _, stderr = proc.communicate(timeout=120)
    assert "stopped: stopped by SIGUSR1" in stderr, stderr[-3000:]

    step = int((stopped / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 10 <= step < 60
    assert max(losses(stopped)) == step  # the signal's step was finished, logged and saved
    train(stopped, prepared_dir, *STEPS, nproc=2)
    expected, got = losses(reference), losses(stopped)
    assert got == expected
