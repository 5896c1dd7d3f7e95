"""Where this process sits in the job: torchrun, SLURM or a single process.

The trainer reads the environment (launch scripts only build commands). Everything here is
plain data plus three functions: ``detect_world``, ``init_distributed`` and
``shutdown_distributed``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_world() -> World:
    """Read rank and world size from torchrun's variables, else an srun step's, else one process.

    Under ``srun torchrun`` (one task per node) torchrun's variables win: the SLURM task is the
    node's launcher, not a rank.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                     "torchrun")
    # Only inside an srun step: the batch script itself also sees SLURM_PROCID=0 and the job's
    # SLURM_NTASKS, and a process started there must not wait for ranks that never come.
    if "SLURM_STEP_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return World(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                     int(env["SLURM_STEP_NUM_TASKS"]), "slurm")
    return World(0, 0, 1, "single")


def device_for(world: World) -> torch.device:
    """One GPU per local rank when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _export_rendezvous(world: World) -> None:
    """torch.distributed's env:// init needs these; torchrun sets them, the others don't."""
    env = os.environ
    env.setdefault("RANK", str(world.rank))
    env.setdefault("LOCAL_RANK", str(world.local_rank))
    env.setdefault("WORLD_SIZE", str(world.world_size))
    if world.launcher == "slurm":
        env.setdefault("MASTER_ADDR", slurm_head_node())
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
    else:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))


def slurm_head_node() -> str:
    """The first host of this SLURM step or job (where rank 0 and the rendezvous live)."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    import subprocess

    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                         text=True, check=False).stdout.split()
    return out[0] if out else nodelist.split(",")[0]


def _default_group_timeout(timeout: timedelta) -> None:
    """Make ``timeout`` the default of every process group, not only the world group: DeepSpeed
    and our signal agreement create sub-groups (``new_group`` without a timeout), and a stalled
    peer must end their collectives too."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def init_distributed(world: World, collective_timeout_s: float = 600.0) -> torch.device:
    """Pick the device, point DeepSpeed at the CPU when there is no GPU, and join the group.

    ``DS_ACCELERATOR`` must be set before DeepSpeed is first imported, so this runs early.
    """
    device = device_for(world)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(device)
    _export_rendezvous(world)
    import deepspeed

    if device.type == "cpu":
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU *inference* on first use
        # (~40 s); training never calls it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if device.type == "cuda" else "gloo"
    # A rank that died or stalls makes its peers' next collective fail after this long instead
    # of hanging the job (NCCL then aborts its communicators: TORCH_NCCL_ASYNC_ERROR_HANDLING).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    _default_group_timeout(timedelta(seconds=collective_timeout_s))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=collective_timeout_s))
    return device


_HOST_GROUP: list[Any] = []  # the gloo group of host_all_reduce, created once


def host_all_reduce(values: list[int], op: str = "max") -> list[int]:
    """Agree on small integers across ranks over gloo, on the host: nothing waits on a GPU
    stream (on a CPU run the world group is gloo already). ``op``: max | min | sum."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    if not _HOST_GROUP:
        _HOST_GROUP.append(None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    flag = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(flag, op=getattr(dist.ReduceOp, op.upper()), group=_HOST_GROUP[0])
    return flag.tolist()


def shutdown_distributed() -> None:
    """Leave the process group while the interpreter is whole: gloo's worker threads, left to
    the interpreter's teardown, can abort the process (SIGABRT, "terminate called without an
    active exception") after a run that succeeded. Only after a run that ended normally: a rank
    whose peers are mid-collective could hang here."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
