"""Typed configuration: the schema (dataclasses) and its registration with Hydra."""

from megatrain.config.schema import (
    Config,
    DataConfig,
    DeepSpeedConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainerConfig,
    register_configs,
)

__all__ = [
    "Config",
    "DataConfig",
    "DeepSpeedConfig",
    "LoggerConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainerConfig",
    "register_configs",
]
