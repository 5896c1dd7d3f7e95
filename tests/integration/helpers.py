"""Run megatrain's commands as real processes: one, or one per rank."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[2]

# A model small enough that tens of steps take seconds on two CPU cores.
TINY = ["model=gpt2-tiny", "model.n_layers=2", "model.d_model=64", "model.n_heads=2",
        "model.d_ff=256", "data.seq_len=64", "trainer.micro_batch_size=4",
        "trainer.precision=fp32", "schedule.warmup_steps=5", "logger.wandb.mode=disabled",
        "logger.progress=false"]
TINY_BERT = ["model=bert-tiny", *TINY[1:]]  # the same dims and settings, a BERT


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


def rank_env(env: dict[str, str], rank: int, nproc: int, port: int) -> dict[str, str]:
    """What a launcher gives rank ``rank`` of ``nproc`` on this machine (env:// rendezvous)."""
    return env | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def run_ranks(module: str, args: list[str], nproc: int, timeout: int,
              env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """One process per rank, started as srun starts them, and ended as torchrun ends them: when
    one rank fails, the others are killed. Output: rank 0's, then rank 1's, ... This saves each
    run torchrun's own start-up (~2 s on two cores); tests of torchrun itself use torchrun."""
    port = _free_port()
    with contextlib.ExitStack() as files:
        outs = [[files.enter_context(tempfile.TemporaryFile("w+")) for _ in "oe"]
                for _ in range(nproc)]
        ranks = [subprocess.Popen(module_command(module, args), cwd=REPO, stdout=out, stderr=err,
                                  env=rank_env(env, rank, nproc, port), text=True)
                 for rank, (out, err) in enumerate(outs)]
        _wait_or_kill_all(ranks, timeout)
        code = next((r.returncode for r in ranks if r.returncode), 0)
        return subprocess.CompletedProcess(ranks[0].args, code, _read_all(o for o, _ in outs),
                                           _read_all(e for _, e in outs))


def _wait_or_kill_all(ranks: list[subprocess.Popen[str]], timeout: float) -> None:
    """Until every rank has ended or one has failed (the others are then killed)."""
    deadline = time.monotonic() + timeout
    while any(r.poll() is None for r in ranks) and not any(r.poll() for r in ranks):
        if time.monotonic() > deadline:
            for rank in ranks:
                rank.kill()
            raise subprocess.TimeoutExpired(ranks[0].args, timeout)
        time.sleep(0.05)
    for rank in ranks:
        if rank.poll() is None:
            rank.kill()
        rank.wait()


def _read_all(files: Iterable[IO[str]]) -> str:
    text = []
    for f in files:
        f.seek(0)
        text.append(f.read())
    return "".join(text)


def run_module(module: str, args: list[str], nproc: int = 1, timeout: int = 600,
               env: dict[str, str] | None = None,
               preexec_fn: Callable[[], None] | None = None,
               torchrun: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``python -m megatrain.<module> args`` to completion, on ``nproc`` ranks (``run_ranks``,
    or torchrun with ``torchrun``); ``preexec_fn`` runs in the child first (e.g. to set resource
    limits)."""
    if nproc > 1 and not torchrun:
        return run_ranks(module, args, nproc, timeout, env or env_for_tests())
    return subprocess.run(module_command(module, args, nproc), cwd=REPO,
                          env=env or env_for_tests(), capture_output=True, text=True,
                          timeout=timeout, check=False, preexec_fn=preexec_fn)


def train(run_dir: Path, data_dir: Path, *overrides: str, nproc: int = 1, check: bool = True,
          torchrun: bool = False, base: list[str] = TINY,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = run_module("train", [*base, f"data.train={data_dir}", f"run.dir={run_dir}",
                                  *overrides], nproc=nproc, torchrun=torchrun, env=env)
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
