"""Where a process sits in the job (megatrain.distributed.detect_world) and how a sweep job
passes its overrides on to torchrun — the pieces of the launch path that need no processes."""

from __future__ import annotations

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from megatrain.distributed import World, detect_world
from megatrain.jobs.torchrun_job import job_overrides

BATCH_SCRIPT = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
                "SLURM_LOCALID": "0"}
SRUN_STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3",
             "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}
TORCHRUN = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}


@pytest.mark.parametrize("env, expected", [
    ({}, World(0, 0, 1, "single")),
    (TORCHRUN, World(5, 1, 8, "torchrun")),
    ({**SRUN_STEP, **TORCHRUN}, World(5, 1, 8, "torchrun")),  # srun runs torchrun: it wins
    (SRUN_STEP, World(3, 1, 4, "slurm")),  # srun -n 4 python -m megatrain.train
    (BATCH_SCRIPT, World(0, 0, 1, "single")),  # the batch script is not rank 0 of 2
])
def test_detect_world(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                      expected: World) -> None:
    for key in {*BATCH_SCRIPT, *SRUN_STEP, *TORCHRUN}:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert detect_world() == expected


def test_sweep_job_overrides_replace_the_run_folder_and_parse_back() -> None:
    cfg = OmegaConf.create({"run": {"dir": "/sweeps/it's a/0", "name": "lr-0"},
                            "logger": {"wandb": {"group": None}}})
    got = job_overrides(cfg, ["optim.lr=0.001", "run.dir=/elsewhere", "+extra=1"])
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(got)}
    assert parsed == {"optim.lr": 0.001, "extra": 1, "run.dir": "/sweeps/it's a/0",
                      "run.name": "lr-0", "logger.wandb.group": None}
