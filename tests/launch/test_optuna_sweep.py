"""An Optuna search sweep (hydra/sweeper=optuna) through the submitit SLURM launcher: each trial a
SLURM job with its own torchrun; trial 0 is preempted (SLURM's warning signal), saves, requeues and
resumes; the summary names the best trial."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import REPO, TINY, metrics
from tests.launch.helpers import job_field, launch_env, wait_for_step

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]
STEPS = 60


def test_optuna_sweep_through_submitit_slurm(tmp_path: Path, prepared_dir: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "megatrain.train", "-m", "hydra/sweeper=optuna",
           "hydra.sweeper.n_trials=3", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
           "hydra.launcher.signal_delay_s=60", f"hydra.sweep.dir={sweep_dir}",
           "run.name=lrsearch", *TINY, f"data.train={prepared_dir}", f"trainer.max_steps={STEPS}",
           "trainer.log_every=1", f"trainer.eval_every={STEPS}", "trainer.save_every=1000",
           "optim.lr=tag(log, interval(1e-4, 3e-2))"]
    driver = subprocess.Popen(cmd, cwd=REPO, env=launch_env(NPROC_PER_NODE="1"), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(sweep_dir / "0", 5)
    # One trial at a time (n_jobs 1): each is a plain SLURM job, its folder named by its job id.
    folder = min((p for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()),
                 key=lambda p: int(p.name))
    subprocess.run(["scancel", "--signal=USR2", folder.name], check=True)
    stdout, stderr = driver.communicate(timeout=420)
    assert driver.returncode == 0, stdout[-3000:] + stderr[-5000:]

    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    jobs = summary["jobs"]
    assert [job["job"] for job in jobs] == [0, 1, 2]
    for job in jobs:
        rows = metrics(sweep_dir / str(job["job"]))
        assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
        final = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
        assert job["status"] == "completed" and job["value"] == pytest.approx(final)
    best = min(jobs, key=lambda job: job["value"])
    assert summary["best"]["job"] == best["job"]
    assert f"best: job {best['job']} ({best['swept'][0]})" in stdout

    log = next(folder.glob("*_log.out")).read_text()
    assert "the ranks save and stop" in log and "resumed from" in log, log[-3000:]
    assert job_field(folder.name, "Restarts") == "1"
