"""SIGTERM / SIGUSR1: every rank finishes the step, saves, exits "requeue me"; the rerun continues
exactly where an uninterrupted run would be."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from megatrain.errors import EXIT_REQUEUE
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


def _start(run_dir: Path, data_dir: Path, nproc: int) -> subprocess.Popen[str]:
    args = [*TINY, f"data.train={data_dir}", f"run.dir={run_dir}", *STEPS]
    return subprocess.Popen(module_command("train", args, nproc), cwd=REPO, env=env_for_tests(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if last_step(run_dir) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"never reached step {step}: {proc.communicate()[1][-3000:]}")


def _rank_pids(torchrun_pid: int) -> list[int]:
    return sorted(child.pid for child in psutil.Process(torchrun_pid).children())


# One process and SIGTERM: tests/integration/test_faults.py (five of them, bit-identical).
@pytest.mark.parametrize("nproc, sig", [(2, signal.SIGUSR1)])
def test_signal_saves_stops_and_resumes_exactly(tmp_path: Path, prepared_dir: Path, nproc: int,
                                                sig: signal.Signals) -> None:
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    train(reference, prepared_dir, *STEPS, nproc=nproc)

    proc = _start(stopped, prepared_dir, nproc)
    _wait_for_step(stopped, 10, proc)
    # One process: the trainer itself. Two: only rank 1 hears it; rank 0 must still agree.
    target = proc.pid if nproc == 1 else _rank_pids(proc.pid)[-1]
    time.sleep(0.3)
    subprocess.run(["kill", f"-{sig.name.removeprefix('SIG')}", str(target)], check=True)
    _, stderr = proc.communicate(timeout=120)
    if nproc == 1:
        assert proc.returncode == EXIT_REQUEUE, stderr[-3000:]
    assert f"stopped: stopped by {sig.name}" in stderr, stderr[-3000:]

    step = int((stopped / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 10 <= step < 60
    assert max(losses(stopped)) == step  # the signal's step was finished, logged and saved
    train(stopped, prepared_dir, *STEPS, nproc=nproc)
    expected, got = losses(reference), losses(stopped)
    assert got == expected
