"""The Hydra config: composes from the shipped files, checked against the typed schema."""

from __future__ import annotations

import dataclasses
from importlib.resources import files

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from megatrain.config import Config, register_configs
from megatrain.config.validate import Range, check_ranges, normalize_overrides
from megatrain.errors import ConfigError
from megatrain.models.registry import get_model_spec, resolve_model_config


def _compose(*overrides: str):
    register_configs()
    with initialize_config_module("megatrain.configs", version_base=None):
        return compose("config", overrides=list(overrides))


def _options(group: str) -> list[str]:
    """The shipped options of a group, listed from the files (not through the code under test)."""
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


# --- checks before anything is built (megatrain.config.validate) ------------------------------


@pytest.mark.parametrize("arg", ["experiment=nope", "+experiment=bert_quickstat",
                                 "experiment=quickstart,nope", "model=gpt3", "deepspeed=zero5"])
def test_an_unknown_group_option_is_refused_listing_the_valid_ones(arg: str) -> None:
    group = arg.lstrip("+").split("=")[0]
    with pytest.raises(ConfigError, match=f"no such {group}; valid: .*{_options(group)[0]}"):
        normalize_overrides(["trainer.max_steps=3", arg])


def test_known_group_options_pass_and_an_appended_group_is_read_as_a_choice() -> None:
    args = ["-m", "+experiment=quickstart", "model=gpt2-tiny,llama-tiny", "model.n_layers=2",
            "hydra/launcher=slurm", "~logger", "optim=choice(adamw)"]
    assert normalize_overrides(args) == ["-m", "experiment=quickstart", *args[2:]]
    assert _compose(*normalize_overrides(["+experiment=t5_quickstart"])).model.family == "t5"


def test_options_in_user_config_folders_are_left_to_hydra() -> None:
    args = ["--config-dir", "mine", "experiment=my_own"]
    assert normalize_overrides(args) == args


def test_an_unknown_experiment_fails_composition_too() -> None:
    """Without the command-line check (the compose API), Hydra itself refuses it: the group is
    no longer optional, which silently skipped a missing option."""
    with pytest.raises(ConfigCompositionException, match="experiment/nope"):
        _compose("experiment=nope")


def _ranged_fields(schema: type = Config, prefix: str = ""):
    for field in dataclasses.fields(schema):
        made = None if field.default_factory is dataclasses.MISSING else field.default_factory()
        if dataclasses.is_dataclass(made):
            yield from _ranged_fields(type(made), f"{prefix}{field.name}.")
        elif "range" in field.metadata:
            yield f"{prefix}{field.name}", field.metadata["range"]


RANGED = dict(_ranged_fields())


def _outside(rng: Range) -> float:
    """A value just outside the range."""
    if rng.lo is not None:
        return rng.lo if rng.lo_open else rng.lo - 1
    return rng.hi if rng.hi_open else rng.hi + 1


def test_the_numeric_keys_declare_ranges() -> None:
    assert {"trainer.micro_batch_size", "trainer.grad_accum_steps", "data.seq_len",
            "data.mask_prob", "optim.lr", "optim.betas", "schedule.min_lr_ratio",
            "deepspeed.zero_stage", "model.dropout", "data.num_workers"} <= RANGED.keys()
    assert len(RANGED) >= 45


@pytest.mark.parametrize("key", sorted(RANGED))
def test_a_value_outside_a_declared_range_is_one_line_naming_the_key(key: str) -> None:
    rng = RANGED[key]
    value = _outside(rng)
    override = f"{key}=[0.9,{value}]" if key == "optim.betas" else f"{key}={value}"
    cfg = _compose(override)
    with pytest.raises(ConfigError) as err:
        check_ranges(cfg, Config)
    assert str(err.value).startswith(f"{key}=") and "\n" not in str(err.value)
    assert f"must be {rng.describe()}" in str(err.value)


@pytest.mark.parametrize("group", ["experiment", "model", "deepspeed"])
def test_every_shipped_option_is_within_the_ranges(group: str) -> None:
    for option in _options(group):
        check_ranges(_compose(f"{group}={option}"), Config)


def test_every_bad_key_is_named() -> None:
    cfg = _compose("trainer.micro_batch_size=0", "optim.lr=-1", "data.mask_prob=2")
    with pytest.raises(ConfigError, match=r"^data.mask_prob=2.0: must be in \(0, 1\] \(and 2 "
                                          r"more: optim.lr=-1.0: must be > 0; "
                                          r"trainer.micro_batch_size=0: must be >= 1\)$"):
        check_ranges(cfg, Config)
