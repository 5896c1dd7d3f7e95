"""A Hydra sweep job starts its own torchrun: under submitit (``hydra/launcher=slurm``) and under
the basic launcher alike.

Hydra multirun with distributed training is a known trap: if the process that Hydra runs the task
function in became a rank, every rank would also be a sweep driver. So in a sweep job (the basic
launcher's, or submitit's with one task per node, ``tasks_per_node: 1``) the task function does not
train. It re-launches

    python -m torch.distributed.run --nnodes N --nproc-per-node P <rendezvous> \
        -m megatrain.train <the job's overrides> run.dir=<job dir> run.name=... logger.wandb.group=...

on each node of the job (c10d rendezvous on the job's first node; ``--standalone`` on one node),
waits, and returns the final eval metrics that the trainer reports in its exit status
(``megatrain.jobs.exit_status``). Ranks per node: ``$NPROC_PER_NODE``, else
``hydra.launcher.gpus_per_node``, else 1.

Preemption and time limits: submitit asks SLURM for ``--signal=USR2@signal_delay_s`` and requeues
the job from its USR2 handler. torchrun and the ranks start with USR1 and USR2 ignored (torchrun
would die of either, orphaning the ranks; the trainer installs its own USR1 handler). Our USR2
handler first sends USR1 to the ranks, waits until they have saved and stopped (exit 75), then
hands over to submitit's handler, which requeues the job; the requeued job runs this function
again with the same overrides and the trainer resumes from the job's run folder. A trainer that
stops with 75 on its own (someone sent the ranks USR1) goes through the same requeue.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from megatrain.errors import EXIT_OK, EXIT_REQUEUE
from megatrain.jobs.exit_status import EXIT_STATUS_ENV, describe, read_exit_status
from megatrain.jobs.sweep import overridden_keys

log = logging.getLogger("megatrain")
JOB_KEYS = ("run.dir", "run.name", "logger.wandb.group")  # what prepare_sweep_job decides
_SAFE_VALUE = re.compile(r"^[\w./:@+-]*$")


class SweepJobFailed(RuntimeError):
    """The trainer of a sweep job ended with an error; Hydra marks the job failed."""


def _override(key: str, value: Any) -> str:
    """``key=value`` in Hydra's override syntax, quoting values that need it."""
    if value is None:
        return f"{key}=null"
    text = str(value)
    if _SAFE_VALUE.match(text):
        return f"{key}={text}"
    return "{}='{}'".format(key, text.replace("\\", "\\\\").replace("'", "\\'"))


def job_overrides(cfg: DictConfig, task_overrides: list[str]) -> list[str]:
    """The job's own overrides plus the run folder, name and group decided for it."""
    kept = [o for o in task_overrides if not overridden_keys([o]) & set(JOB_KEYS)]
    decided = {"run.dir": cfg.run.dir, "run.name": cfg.run.name,
               "logger.wandb.group": cfg.logger.wandb.group}
    return kept + [_override(key, value) for key, value in decided.items()]


def rendezvous_args(env: dict[str, str]) -> list[str]:
    """torchrun's rendezvous for this job: standalone on one node, c10d on the first node else."""
    nnodes = int(env.get("SLURM_JOB_NUM_NODES", "1"))
    if nnodes == 1:
        return ["--standalone", "--nnodes=1"]
    from megatrain.distributed import slurm_head_node

    job_id = env.get("SLURM_JOB_ID", "0")
    port = 20000 + int(job_id) % 10000
    return [f"--nnodes={nnodes}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={slurm_head_node()}:{port}", f"--rdzv-id={job_id}"]


def ranks_per_node(launcher: Any, env: dict[str, str]) -> int:
    if env.get("NPROC_PER_NODE"):
        return int(env["NPROC_PER_NODE"])
    return int(launcher.get("gpus_per_node") or 1)


def torchrun_command(cfg: DictConfig) -> list[str]:
    hydra = HydraConfig.get()
    env = dict(os.environ)
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous_args(env),
            f"--nproc-per-node={ranks_per_node(hydra.launcher, env)}",
            "-m", "megatrain.train", *job_overrides(cfg, list(hydra.overrides.task))]


@contextmanager
def _scheduler_signals_ignored() -> Iterator[None]:
    """USR1 and USR2 ignored while a child starts: SIG_IGN survives exec, a handler does not."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGUSR1,
                                                                     signal.SIGUSR2)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Torchrun:
    """torchrun as a child process, reaped by a thread so a signal handler can wait for it."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        log.info("sweep job: %s", " ".join(cmd))
        with _scheduler_signals_ignored():
            self.proc = subprocess.Popen(cmd, env=env)
        self.done = threading.Event()
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        self.proc.wait()
        self.done.set()

    def wait(self) -> int:
        # Poll with sleeps, holding no lock: our USR2 handler runs in this thread, between two
        # sleeps, and waits on ``done`` itself.
        while not self.done.is_set():
            time.sleep(0.2)
        return self.proc.returncode

    def stop_ranks(self, timeout: float) -> bool:
        """USR1 to the ranks (torchrun's children); True when torchrun ended within timeout."""
        import psutil

        try:
            ranks = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            ranks = []
        for rank in ranks:
            try:
                rank.send_signal(signal.SIGUSR1)
            except psutil.NoSuchProcess:
                pass
        return self.done.wait(timeout)


def _submitit_handler() -> Callable[[int, FrameType | None], Any] | None:
    handler = signal.getsignal(signal.SIGUSR2)
    return handler if callable(handler) else None


def _install_stop_then_requeue(torchrun: Torchrun, grace: float) -> Callable[[], None]:
    """Chain our USR2 handler in front of submitit's; returns what hands over to submitit."""
    submitit_requeue = _submitit_handler()

    def hand_over() -> None:
        if submitit_requeue is not None:
            submitit_requeue(signal.SIGUSR2, None)  # rank 0 of the job requeues and exits

    def on_usr2(signum: int, frame: FrameType | None) -> None:
        log.warning("sweep job: USR2 (preemption or time limit): the ranks save and stop")
        if not torchrun.stop_ranks(grace):
            log.error("sweep job: the ranks did not stop within %.0f s", grace)
        hand_over()

    signal.signal(signal.SIGUSR2, on_usr2)
    return hand_over


def _log_to_stderr() -> None:
    """Our lines into the job's log: Hydra configured no logging here (hydra/job_logging: none)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                               "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def run_sweep_job(cfg: DictConfig) -> dict[str, float] | None:
    """Train this sweep job under torchrun; its final eval metrics, or requeue on exit 75."""
    _log_to_stderr()
    status_path = Path(tempfile.gettempdir()) / f"megatrain-exit-{os.getpid()}.json"
    status_path.unlink(missing_ok=True)
    env = {**os.environ, EXIT_STATUS_ENV: str(status_path)}
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "120")  # SIGTERM: time to save
    grace = max(10.0, float(HydraConfig.get().launcher.get("signal_delay_s") or 120) - 10)
    torchrun = Torchrun(torchrun_command(cfg), env)
    hand_over = _install_stop_then_requeue(torchrun, grace)
    code = torchrun.wait()
    status = read_exit_status(status_path) or {}
    status_path.unlink(missing_ok=True)
    code = status.get("exit_code", code)
    log.info("sweep job: trainer exited %d (%s)", code, describe(code))
    if code == EXIT_REQUEUE:
        hand_over()  # rank 0 requeues and exits; on other nodes submitit's handler returns
        return None
    if code != EXIT_OK:
        raise SweepJobFailed(f"trainer exited {code}: {status.get('message') or describe(code)}")
    result = status.get("result") or {}
    log.info("sweep job: result %s", json.dumps(result))
    return result
