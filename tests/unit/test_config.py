"""The Hydra config: composes from the shipped files, checked against the typed schema."""

from __future__ import annotations

from importlib.resources import files

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from megatrain.config import register_configs
from megatrain.models.registry import get_model_spec, resolve_model_config


def _compose(*overrides: str):
    register_configs()
    with initialize_config_module("megatrain.configs", version_base=None):
        return compose("config", overrides=list(overrides))


def _options(group: str) -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in files("megatrain.configs").joinpath(group)
                  .iterdir() if p.name.endswith(".yaml"))


def test_defaults_compose() -> None:
    cfg = _compose()
    assert cfg.model.family == "gpt" and cfg.model.size == "gpt2-tiny"
    assert cfg.data.train == "stdlib"
    assert cfg.run.dir == "outputs/run"
    assert cfg.deepspeed.zero_stage == 0


def test_quickstart_experiment_sets_its_run() -> None:
    cfg = _compose("experiment=quickstart")
    assert cfg.run.dir == "outputs/quickstart"
    assert cfg.trainer.sample_prompt


@pytest.mark.parametrize("override", ["trainer.max_stepz=3", "optim.lrr=0.1"])
def test_misspelt_key_is_rejected(override: str) -> None:
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].split(".")[1]):
        _compose(override)


def test_wrong_type_is_rejected() -> None:
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValueError)):
        _compose("trainer.max_steps=many")


@pytest.mark.parametrize("model", _options("model"))
def test_every_shipped_model_config_builds(model: str) -> None:
    """Every configs/model/*.yaml composes, resolves and builds (on the meta device: no memory)."""
    cfg = _compose(f"model={model}")
    spec = get_model_spec(cfg.model.family)
    resolved = resolve_model_config(cfg.model, vocab_size=1000)
    assert resolved.vocab_size == 1000
    assert spec.flops_per_token(resolved, 128) > 0
    built = spec.build(resolved, "meta", torch.float32)
    assert len(list(built.blocks)) >= resolved.n_layers
    assert sum(p.numel() for p in built.parameters()) > 1000 * resolved.d_model


@pytest.mark.parametrize("group", ["experiment", "deepspeed", "data", "optim", "trainer", "logger"])
def test_every_shipped_option_composes(group: str) -> None:
    for option in _options(group):
        assert _compose(f"{group}={option}") is not None
