"""launch/slurm/pretrain.sbatch on a real SLURM cluster (tools/slurm_local.sh): 2 CPU ranks under
srun + torchrun, a USR1 that saves, requeues and resumes exactly, and the two ways a job ends for
good: a config error, or the kill switch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from megatrain.errors import EXIT_CONFIG, EXIT_REQUEUE
from tests.launch.helpers import (
    TINY,
    job_field,
    job_logs,
    same_metrics,
    submit,
    train_args,
    wait_for_job,
    wait_for_step,
    wandb_offline_runs,
)

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def test_sbatch_two_cpu_ranks_match_plain_torchrun(tmp_path: Path, prepared_dir: Path,
                                                   reference_run: Path) -> None:
    run_dir = tmp_path / "sbatch"
    job = submit(run_dir, "--nproc-per-node", "2", "--", *train_args(prepared_dir))
    state = wait_for_job(job, run_dir)
    assert state == "COMPLETED", job_logs(run_dir)
    assert job_field(job, "Restarts") == "0"
    assert "2 rank(s)" in job_logs(run_dir)
    same_metrics(run_dir, reference_run)


def test_usr1_saves_requeues_and_resumes_exactly(tmp_path: Path, prepared_dir: Path,
                                                 reference_run: Path) -> None:
    """USR1 to the batch shell → the ranks save → exit 75 → requeue → the same W&B run resumes."""
    run_dir = tmp_path / "requeue"
    job = submit(run_dir, "--nproc-per-node", "2", "--",
                 *train_args(prepared_dir, "logger.wandb.mode=offline"))
    wait_for_step(run_dir, 5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True)
    state = wait_for_job(job, run_dir)
    logs = job_logs(run_dir)
    assert state == "COMPLETED", logs
    assert job_field(job, "Restarts") == "1", logs
    assert "saved and stopped: requeueing" in logs
    first = (run_dir / "logs" / f"slurm-{job}-attempt0-node0.log").read_text()
    assert f"trainer exited {EXIT_REQUEUE}" in first and "stopped by SIGUSR1" in first
    second = (run_dir / "logs" / f"slurm-{job}-attempt1-node0.log").read_text()
    assert "resumed from" in second and "trainer exited 0" in second
    same_metrics(run_dir, reference_run)

    runs = wandb_offline_runs(run_dir)
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]  # one W&B run across the requeue
    steps = runs[0]["steps"] + runs[1]["steps"]
    assert steps == sorted(set(steps)) and steps[-1] == 100  # only ever increasing
    assert runs[1]["steps"][0] == runs[0]["steps"][-1] + 1
    assert runs[0]["config"]["trainer"]["max_steps"] == 100  # the resolved config is logged
    assert f"wandb sync {runs[0]['folder']}" in first


def test_config_error_or_kill_switch_ends_the_job_without_requeue(tmp_path: Path,
                                                                  prepared_dir: Path) -> None:
    """Exit 2 is never requeued; exit 75 is not when <run dir>/NO_REQUEUE exists. Both jobs have
    one rank each and run side by side."""
    bad, stopped = tmp_path / "bad", tmp_path / "stopped"
    bad_job = submit(bad, "--nproc-per-node", "1", "--cpus-per-task", "1", "--", *TINY,
                     "data.train=/nonexistent/corpus", "trainer.max_steps=10")
    stopped.mkdir()
    (stopped / "NO_REQUEUE").touch()
    stopped_job = submit(stopped, "--nproc-per-node", "1", "--cpus-per-task", "1", "--",
                         *train_args(prepared_dir, "trainer.max_steps=1000",
                                    "schedule.total_steps=1000"))
    wait_for_step(stopped, 2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(stopped_job)], check=True)

    for job, run_dir, code in ((bad_job, bad, EXIT_CONFIG), (stopped_job, stopped, EXIT_REQUEUE)):
        state = wait_for_job(job, run_dir)
        logs = job_logs(run_dir)
        assert state == "FAILED", logs
        assert job_field(job, "ExitCode") == f"{code}:0", logs
        assert job_field(job, "Requeue") == "1"  # it could have been requeued, and was not
        assert job_field(job, "Restarts") == "0", logs
        assert [p.name for p in (run_dir / "logs").glob("*attempt*")] == [
            f"slurm-{job}-attempt0-node0.log"]
    assert "/nonexistent/corpus" in job_logs(bad)
    assert "configuration or input error; not requeueing" in job_logs(bad)
    assert "NO_REQUEUE exists: not requeueing" in job_logs(stopped)
    assert (stopped / "checkpoints" / "latest").exists()  # it did save before stopping
