"""``megatrain-train``: the Hydra app that trains a model.

    megatrain-train experiment=quickstart trainer.max_steps=200
    torchrun --nproc_per_node 8 -m megatrain.train model=gpt2-small deepspeed=zero2
    megatrain-train --rerun outputs/quickstart run.dir=outputs/again   # same overrides again
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from megatrain.cli.common import report
from megatrain.config import register_configs
from megatrain.config.validate import normalize_overrides
from megatrain.errors import EXIT_OK, ConfigError, MegatrainError
from megatrain.jobs.exit_status import record_exit
from megatrain.jobs.optuna_sweeper import (
    register as register_optuna_sweeper,
)
from megatrain.jobs.run_record import (
    align_run_dirs,
    check_not_source,
    expand_rerun,
    job_log,
    write_run_record,
)
from megatrain.jobs.sweep import in_multirun, prepare_sweep_job
from megatrain.jobs.torchrun_job import run_sweep_job
from megatrain.training.run import checked_config, run_training

_rerun_source: Path | None = None  # --rerun's run folder: the rerun must train elsewhere


@hydra.main(version_base=None, config_path="pkg://megatrain.configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> dict[str, float] | None:
    prepare_sweep_job(cfg)
    # A job of a multirun, whatever its launcher, starts its own ranks (torchrun), never is
    # one: the basic launcher runs jobs one after another in the Hydra process, which cannot
    # host a second DeepSpeed run (its process groups stay cached) nor survive a job's sys.exit.
    if in_multirun():
        return run_sweep_job(cfg)
    try:
        check_not_source(cfg, _rerun_source)
        config = checked_config(cfg)  # a config that cannot run leaves no record behind
        write_run_record(cfg)
        with job_log(cfg):
            result = run_training(cfg, config)
    except MegatrainError as err:
        record_exit(err.exit_code, f"{err.label}: {err}")
        sys.exit(report(err))
    except Exception as err:
        record_exit(1, f"crashed: {type(err).__name__}: {err}")
        raise
    record_exit(EXIT_OK, "done", result)
    return result  # the final eval metrics: what a Hydra sweep ranks its jobs by


def main() -> None:
    global _rerun_source
    try:
        args, _rerun_source = expand_rerun(sys.argv[1:])
        sys.argv[1:] = align_run_dirs(normalize_overrides(args))  # Hydra reads them from there
    except ConfigError as err:
        sys.exit(report(err))
    register_configs()
    register_optuna_sweeper()
    _hydra_main()


if __name__ == "__main__":
    main()
