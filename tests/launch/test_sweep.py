"""Hydra multirun through the submitit SLURM launcher (hydra/launcher=slurm): each job is a SLURM
job that starts its own torchrun; a job preempted with SLURM's warning signal saves, requeues and
resumes; the sweep ends with a summary, also as a W&B run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import REPO, TINY, metrics
from tests.launch.helpers import job_field, launch_env, wait_for_step, wandb_offline_runs

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]
STEPS = 100


def _start_sweep(sweep_dir: Path, data_dir: Path) -> subprocess.Popen[str]:
    """Two learning rates; one CPU rank per job, so both jobs fit the 2-CPU node at once."""
    cmd = [sys.executable, "-m", "megatrain.train", "-m", "hydra/launcher=slurm",
           "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.timeout_min=10", "hydra.launcher.signal_delay_s=60",
           f"hydra.sweep.dir={sweep_dir}", "run.name=lrsweep", *TINY, f"data.train={data_dir}",
           f"trainer.max_steps={STEPS}", "trainer.log_every=1", f"trainer.eval_every={STEPS}",
           "trainer.save_every=1000", "logger.wandb.mode=offline", "optim.lr=1e-3,4e-3"]
    return subprocess.Popen(cmd, cwd=REPO, env=launch_env(NPROC_PER_NODE="1"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _submitit_log(sweep_dir: Path, job: int) -> str:
    return next((sweep_dir / ".submitit").glob(f"*_{job}/*_log.out")).read_text()


def _preempt(sweep_dir: Path, job: int) -> str:
    """SLURM's time-limit warning (USR2 for submitit) to every process of the job; its id."""
    (folder,) = (sweep_dir / ".submitit").glob(f"*_{job}")
    subprocess.run(["scancel", "--signal=USR2", folder.name], check=True)
    return folder.name


def test_multirun_over_two_lrs_through_submitit_slurm(tmp_path: Path, prepared_dir: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    driver = _start_sweep(sweep_dir, prepared_dir)
    wait_for_step(sweep_dir / "0", 5)
    preempted = _preempt(sweep_dir, 0)
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stdout[-3000:] + stderr[-5000:]

    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    jobs = summary["jobs"]
    assert [job["swept"] for job in jobs] == [["optim.lr=0.001"], ["optim.lr=0.004"]]
    for job in jobs:
        job_dir = sweep_dir / str(job["job"])
        assert job["status"] == "completed" and job["job_dir"] == str(job_dir)
        rows = metrics(job_dir)
        assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
        final = [r for r in rows if "eval_loss" in r][-1]
        assert final["step"] == STEPS and job["eval_loss"] == pytest.approx(final["eval_loss"])
        log = _submitit_log(sweep_dir, job["job"])
        # The SLURM job's own process started torchrun and was no rank itself.
        assert "sweep job: " in log and "-m torch.distributed.run" in log, log[-3000:]
        assert "trainer exited 0" in log
    assert jobs[0]["eval_loss"] != jobs[1]["eval_loss"]
    best = min(jobs, key=lambda job: job["eval_loss"])
    assert summary["best"]["job"] == best["job"]
    assert f"best: job {best['job']} ({' '.join(best['swept'])})" in stdout

    # The preempted job saved, was requeued once and resumed; the other ran straight through.
    log = _submitit_log(sweep_dir, 0)
    assert "the ranks save and stop" in log and "stopped by SIGUSR1" in log, log[-3000:]
    assert "resumed from" in log
    assert job_field(preempted, "Restarts") == "1"

    # W&B: each job its own run in the sweep's group, one run id across the requeue, steps only
    # increasing; the summary is one more run in the group.
    job_runs = [wandb_offline_runs(sweep_dir / str(job["job"])) for job in jobs]
    assert [len(runs) for runs in job_runs] == [2, 1]
    assert {run["group"] for runs in job_runs for run in runs} == {"lrsweep"}
    assert len({run["id"] for run in job_runs[0]}) == 1 and job_runs[0][0]["id"] != \
        job_runs[1][0]["id"]
    steps = job_runs[0][0]["steps"] + job_runs[0][1]["steps"]
    assert steps == sorted(set(steps))
    (summary_run,) = wandb_offline_runs(sweep_dir)
    assert summary_run["group"] == "lrsweep"
    assert summary_run["summary"]["best_eval_loss"] == pytest.approx(best["eval_loss"])
    assert summary_run["summary"]["best_overrides"] == " ".join(best["swept"])
