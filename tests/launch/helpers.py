"""Launch-test helpers: launch scripts as real processes, SLURM jobs, W&B offline run files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from megatrain.metrics import wandb_log
from tests.integration.helpers import REPO, TINY, env_for_tests, last_step, losses, metrics

# The quickstart experiment, shrunk so a run takes seconds: every launch test trains this.
RUN = ("experiment=quickstart", "trainer.sample_prompt=null", "trainer.max_steps=100",
       "schedule.total_steps=100", "trainer.log_every=1", "trainer.eval_every=50",
       "trainer.save_every=1000")
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
SUBMIT_SH = REPO / "launch" / "slurm" / "submit.sh"
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of a launch script (and, through sbatch, of its job)."""
    return {**env_for_tests(), "PYTHON": sys.executable, **extra}


def train_args(data_dir: Path, *overrides: str) -> list[str]:
    """The reference run's overrides (a launch script adds the run folder)."""
    return [*TINY, *RUN, f"data.train={data_dir}", *overrides]


def same_metrics(run_dir: Path, reference: Path) -> None:
    """Every train loss and eval loss equal to the reference's (an AssertionError says where)."""
    assert losses(run_dir) == losses(reference)
    evals = {r["step"]: r["eval_loss"] for r in metrics(run_dir) if "eval_loss" in r}
    assert evals == {r["step"]: r["eval_loss"] for r in metrics(reference) if "eval_loss" in r}
    assert sorted(evals) == [50, 100]


# --- SLURM ------------------------------------------------------------------------------------

def slurm_unavailable() -> str | None:
    """Why SLURM tests cannot run here, or None when a node accepts 2-CPU jobs."""
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (sudo tools/slurm_local.sh up installs and starts one)"
    out = subprocess.run(["sinfo", "-h", "-o", "%T %c"], capture_output=True, text=True,
                         check=False, timeout=30)
    if out.returncode != 0:
        return f"SLURM does not answer (tools/slurm_local.sh up starts it): {out.stderr.strip()}"
    nodes = [line.split() for line in out.stdout.splitlines() if line.strip()]
    usable = [cpus for state, cpus in nodes if re.match(r"idle|mixed|alloc|complet", state)]
    if not any(int(cpus.rstrip("+")) >= 2 for cpus in usable):
        return f"no SLURM node with 2 CPUs accepts jobs (sinfo: {out.stdout.strip()!r})"
    return None


def submit(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> int:
    """``launch/slurm/submit.sh`` with 2 CPU ranks on 2 CPUs; returns the job id."""
    cmd = ["bash", str(SUBMIT_SH), "--name", run_dir.name, "--run-dir", str(run_dir),
           "--time", "10:00", "--grace", "30", "--cpus-per-task", "2", *args]
    out = subprocess.run(cmd, cwd=REPO, env=env or launch_env(), capture_output=True, text=True,
                         check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def job_field(job_id: int, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True,
                         text=True, check=True).stdout
    match = re.search(rf"\b{name}=(\S+)", out)
    assert match, f"no {name} in: {out}"
    return match.group(1)


def wait_for_job(job_id: int, run_dir: Path, timeout: float = 150) -> str:
    """Wait until the job (with all its requeues) has ended; its final state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_field(job_id, "JobState")
        if state in FINAL_STATES:
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", str(job_id)], check=False)
    raise AssertionError(f"job {job_id} still {state} after {timeout:.0f}s:\n{job_logs(run_dir)}")


def job_logs(run_dir: Path) -> str:
    """The batch log and the last lines of every attempt's log, for failure messages."""
    parts = []
    for path in sorted((run_dir / "logs").glob("slurm-*")):
        parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def wait_for_step(run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if last_step(run_dir) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"never reached step {step}:\n{job_logs(run_dir)}")


# --- W&B offline runs -------------------------------------------------------------------------

def wandb_records(path: Path) -> Iterator[object]:
    """The protobuf records of a ``run-<id>.wandb`` file (a LevelDB-style log of 32 KiB blocks)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    yield from wandb_log.records(path)


def wandb_offline_runs(run_dir: Path) -> list[dict]:
    """Each offline run folder, oldest first: its run id, group, steps, config and summary."""
    runs = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        info: dict = {"folder": folder, "steps": [], "config": {}, "summary": {}}
        for record in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":  # the run record carries the config given to wandb.init
                info["id"], info["group"] = record.run.run_id, record.run.run_group
                info["config"].update(_config_items(record.run.config))
            elif kind == "config":
                info["config"].update(_config_items(record.config))
            elif kind == "history":
                info["steps"].append(record.history.step.num)
            elif kind == "summary":
                info["summary"].update({item.key: json.loads(item.value_json)
                                        for item in record.summary.update if item.key})
        runs.append(info)
    return runs


def _config_items(config: object) -> dict:
    return {item.key: json.loads(item.value_json) for item in config.update}
