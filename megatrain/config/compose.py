"""The config ``megatrain-train`` runs with, composed in-process (for ``megatrain-plan``, tools and
tests): the shipped configs, the overrides checked as the command checks them, as the schema's
typed dataclasses."""

from __future__ import annotations

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from megatrain.config.schema import Config, register_configs
from megatrain.config.validate import CONFIG_PACKAGE, check_ranges, normalize_overrides


def compose_config(overrides: list[str]) -> Config:
    """The config ``megatrain-train`` would run with these overrides, checked as it checks
    them."""
    register_configs()
    with initialize_config_module(CONFIG_PACKAGE, version_base=None):
        cfg = compose("config", overrides=normalize_overrides(overrides))
    check_ranges(cfg, Config)
    return OmegaConf.to_object(cfg)
