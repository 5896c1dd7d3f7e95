"""Hydra's plugin scan finds ``hydra/sweeper=optuna`` here. The sweeper lives in
``megatrain.jobs.optuna_sweeper``: the scan executes this file without registering it as a module,
and dataclasses with postponed annotations cannot be built in such a module."""

from megatrain.jobs.optuna_sweeper import OptunaSweeper, OptunaSweeperConf

__all__ = ["OptunaSweeper", "OptunaSweeperConf"]
