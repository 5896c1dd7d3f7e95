import math

import pytest

from megatrain.errors import ConfigError
from megatrain.training.schedule import lr_multiplier


def test_warmup_then_cosine_to_min() -> None:
    f = lr_multiplier("cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_linear_wsd_constant() -> None:
    lin = lr_multiplier("linear", 0, 100, 0.0)
    assert lin(50) == pytest.approx(0.5)
    wsd = lr_multiplier("wsd", 10, 100, 0.0, wsd_decay_fraction=0.2)
    assert wsd(50) == 1.0 and wsd(79) == 1.0 and wsd(90) == pytest.approx(0.5)
    const = lr_multiplier("constant", 5, 5, 0.0)
    assert const(1000) == 1.0 and math.isclose(const(0), 0.2)


def test_bad_schedule_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cosine, linear, wsd, constant"):
        lr_multiplier("exp", 0, 10, 0.1)
    with pytest.raises(ConfigError, match="warmup"):
        lr_multiplier("cosine", 100, 50, 0.1)
