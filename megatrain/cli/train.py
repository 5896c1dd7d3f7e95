"""``megatrain-train``: the Hydra app that trains a model.

    megatrain-train experiment=quickstart trainer.max_steps=200
    torchrun --nproc_per_node 8 -m megatrain.train model=gpt2-small deepspeed=zero2
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from megatrain.cli.common import report
from megatrain.config import register_configs
from megatrain.config.validate import normalize_overrides
from megatrain.errors import EXIT_OK, ConfigError, MegatrainError
from megatrain.jobs.exit_status import record_exit
from megatrain.jobs.sweep import prepare_sweep_job
from megatrain.jobs.torchrun_job import in_submitit_job, run_sweep_job
from megatrain.training.run import run_training


@hydra.main(version_base=None, config_path="pkg://megatrain.configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    prepare_sweep_job(cfg)
    if in_submitit_job():  # a sweep job on SLURM: start this job's ranks, never be one
        return run_sweep_job(cfg)
    try:
        result = run_training(cfg)
    except MegatrainError as err:
        record_exit(err.exit_code, f"{err.label}: {err}")
        sys.exit(report(err))
    except Exception as err:
        record_exit(1, f"crashed: {type(err).__name__}: {err}")
        raise
    record_exit(EXIT_OK, "done", result)
    return result.get("eval_loss")  # what a Hydra sweep optimises


def main() -> None:
    try:
        sys.argv[1:] = normalize_overrides(sys.argv[1:])  # Hydra reads them from there
    except ConfigError as err:
        sys.exit(report(err))
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
