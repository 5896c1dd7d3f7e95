"""logger.wandb.log_model / sample_table: off by default, and a value the run cannot honour is a
one-line ConfigError before anything is built (the artifacts themselves:
tests/integration/test_wandb_artifacts.py)."""

from __future__ import annotations

import pytest

from megatrain.config.schema import Config
from megatrain.errors import ConfigError
from megatrain.metrics.wandb_sink import log_model_choice
from megatrain.training.run import check_wandb_extras


def config(**keys: object) -> Config:
    """The schema's defaults with ``section__key=value`` set (``logger__wandb__log_model=...``)."""
    cfg = Config()
    for name, value in keys.items():
        *path, key = name.split("__")
        node = cfg
        for part in path:
            node = getattr(node, part)
        setattr(node, key, value)
    return cfg


def test_off_by_default() -> None:
    cfg = config()
    assert log_model_choice(cfg.logger.wandb.log_model) is None
    assert cfg.logger.wandb.sample_table is False
    check_wandb_extras(cfg)


@pytest.mark.parametrize("value, choice", [("false", None), ("False", None), ("final", "final"),
                                           ("best", "best"), ("BEST", "best")])
def test_log_model_values(value: str, choice: str | None) -> None:
    assert log_model_choice(value) == choice


@pytest.mark.parametrize("keys, message", [
    ({"logger__wandb__log_model": "last"},
     "logger.wandb.log_model='last' is not one of false, final"),
    ({"logger__wandb__log_model": "best"}, "logger.wandb.log_model=best needs trainer.keep_best"),
    ({"logger__wandb__sample_table": True, "trainer__sample_prompt": None},
     "logger.wandb.sample_table=true logs the end-of-run sample: set trainer.sample_prompt"),
])
def test_what_cannot_be_honoured_is_a_config_error(keys: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_wandb_extras(config(**keys))
    assert str(err.value).startswith(message)


def test_what_can_be_honoured_passes() -> None:
    check_wandb_extras(config(logger__wandb__log_model="best", trainer__keep_best="eval_loss",
                              logger__wandb__sample_table=True, trainer__sample_prompt="def "))
