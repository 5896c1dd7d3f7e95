"""Run megatrain's commands as real processes (one, or several under torchrun)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A model small enough that tens of steps take seconds on two CPU cores.
TINY = ["model=gpt2-tiny", "model.n_layers=2", "model.d_model=64", "model.n_heads=2",
        "model.d_ff=256", "data.seq_len=64", "trainer.micro_batch_size=4",
        "trainer.precision=fp32", "schedule.warmup_steps=5", "logger.wandb.mode=disabled", "logger.progress=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for_tests(tmp_cache: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_SILENT="true",
               PYTHONUNBUFFERED="1")
    if tmp_cache is not None:
        env["MEGATRAIN_CACHE"] = str(tmp_cache)
    return env


def module_command(module: str, args: list[str], nproc: int = 1) -> list[str]:
    """``python -m megatrain.<module> args``, under torchrun when ``nproc`` > 1."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={_free_port()}", "-m", f"megatrain.{module}", *args]
    return [sys.executable, "-m", f"megatrain.{module}", *args]


def run_module(module: str, args: list[str], nproc: int = 1, timeout: int = 600,
               env: dict[str, str] | None = None,
               preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``module_command(...)`` to completion; ``preexec_fn`` runs in the child first (e.g.
    to set resource limits)."""
    return subprocess.run(module_command(module, args, nproc), cwd=REPO,
                          env=env or env_for_tests(), capture_output=True, text=True,
                          timeout=timeout, check=False, preexec_fn=preexec_fn)


def train(run_dir: Path, data_dir: Path, *overrides: str, nproc: int = 1,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    result = run_module("train", [*TINY, f"data.train={data_dir}", f"run.dir={run_dir}",
                                  *overrides], nproc=nproc)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics(run_dir) if "loss" in row}


def last_step(run_dir: Path) -> int:
    """The newest step with a logged training loss (0 before the first)."""
    return max(losses(run_dir), default=0) if (run_dir / "metrics.jsonl").exists() else 0
