"""Checks that run before anything is built: config-group choices on the command line, and the
ranges the schema declares for its numeric keys. Each failure is one line (a ConfigError, exit 2).

Hydra checks key names and types; it cannot know that ``trainer.micro_batch_size=-1`` is wrong,
and a misspelt group option only fails inside Hydra with a multi-line report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from importlib.resources import files
from typing import Any

from omegaconf import DictConfig, ListConfig

from megatrain.data import storage
from megatrain.errors import ConfigError

CONFIG_PACKAGE = "megatrain.configs"
PRECISIONS = ("auto", "bf16_if_native", "bf16", "fp16", "fp32")
# The settings a GPU run resolves to bf16 where the GPU has it (megatrain.training.engine).
DEVICE_CHOSEN_PRECISIONS = ("auto", "bf16_if_native")
# Command-line flags that add config folders of the user's: their options are Hydra's to check.
_USER_CONFIG_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "hydra.searchpath")


def group_options(group: str) -> list[str]:
    """The options megatrain ships for a config group, e.g. ``experiment``."""
    folder = files(CONFIG_PACKAGE).joinpath(group)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir()
                  if p.name.endswith(".yaml"))


def config_groups() -> list[str]:
    """The config groups of the primary config (``hydra/...`` groups are Hydra's)."""
    return sorted(p.name for p in files(CONFIG_PACKAGE).iterdir()
                  if p.is_dir() and p.name not in ("hydra", "__pycache__"))


def normalize_overrides(args: list[str]) -> list[str]:
    """``args`` with each config-group choice checked against the shipped options, and
    ``+group=option`` read as ``group=option`` (every group is in the defaults list already).
    ConfigError for an unknown option, listing the valid ones."""
    if any(arg.split("=")[0] in _USER_CONFIG_FLAGS for arg in args):
        return args
    groups = config_groups()
    return [_checked_choice(arg, groups) for arg in args]


def _checked_choice(arg: str, groups: list[str]) -> str:
    key, eq, value = arg.partition("=")
    group = key.lstrip("+")
    if arg.startswith(("-", "~")) or not eq or group not in groups:
        return arg
    options = group_options(group)
    # A sweep lists choices with commas; choice(...)/glob(...)/range(...) are Hydra's to expand.
    chosen = [] if "(" in value else [v.strip() for v in value.split(",")]
    unknown = [v for v in chosen if v not in options]
    if unknown:
        raise ConfigError(f"{group}={unknown[0]}: no such {group}; valid: {', '.join(options)}")
    return f"{group}={value}"


# --- rules across keys ------------------------------------------------------------------------


def check_engine_setup(zero_stage: int, offload_optimizer: bool, offload_param: bool,
                       precision: str) -> None:
    """Refuse the combinations DeepSpeed cannot run, saying why: the trainer (before building
    anything) and the memory planner ask the same question."""
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={zero_stage} is not one of 0, 1, 2, 3")
    if offload_optimizer and zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs ZeRO (deepspeed.zero_stage=1, 2 or "
                          "3): stage 0 keeps no optimizer partitions to offload")
    if offload_param and zero_stage != 3:
        raise ConfigError(f"deepspeed.offload_param needs deepspeed.zero_stage=3 (got "
                          f"{zero_stage}): only stage 3 partitions the parameters")
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not one of {', '.join(PRECISIONS)}")


# --- numeric ranges --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric key: ``lo <= x`` (``lo < x`` when ``lo_open``) and the same
    for ``hi``. A list value (``optim.betas``) is checked element by element; None always passes
    (it means "the default")."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def complaint(self, value: float) -> str | None:
        """Why ``value`` is out of range, or None."""
        too_low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        too_high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        return f"must be {self.describe()}" if too_low or too_high else None

    def describe(self) -> str:
        def num(x: float) -> str:
            return f"{x:g}"
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"in {left}{num(self.lo)}, {num(self.hi)}{right}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        return f"{'<' if self.hi_open else '<='} {num(self.hi)}"


def ranged(default: Any, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> Any:
    """A schema field with a valid range (``check_ranges`` enforces it), e.g.
    ``micro_batch_size: int = ranged(8, ge=1)``."""
    rng = Range(lo=gt if gt is not None else ge, hi=lt if lt is not None else le,
                lo_open=gt is not None, hi_open=lt is not None)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"range": rng})
    return dataclasses.field(default=default, metadata={"range": rng})


def check_ranges(cfg: DictConfig, schema: type) -> None:
    """ConfigError naming the first key of ``cfg`` whose value is outside the range its
    ``schema`` field declares (and listing the others)."""
    errors = [f"{key}={value}: {why}" for key, value, why in _range_errors(cfg, schema, "")]
    if errors:
        more = f" (and {len(errors) - 1} more: {'; '.join(errors[1:])})" if errors[1:] else ""
        raise ConfigError(errors[0] + more)


def _range_errors(cfg: Any, schema: type, prefix: str) -> Iterator[tuple[str, Any, str]]:
    for field in dataclasses.fields(schema):
        key = prefix + field.name
        value = cfg.get(field.name) if cfg is not None else None
        nested = _nested_schema(field)
        if nested is not None:
            yield from _range_errors(value, nested, key + ".")
        elif "range" in field.metadata and value is not None:
            items = list(value) if isinstance(value, (list, ListConfig)) else [value]
            why = next((why for why in map(field.metadata["range"].complaint, items) if why),
                       None)
            if why:
                yield key, value, why


def _nested_schema(field: dataclasses.Field) -> type | None:
    """The dataclass of a nested section (``trainer``, ``logger.wandb``), else None."""
    factory = field.default_factory
    if factory is dataclasses.MISSING:
        return None
    made = factory()
    return type(made) if dataclasses.is_dataclass(made) else None


def corpus_locations(data_cfg: Any) -> dict[str, str]:
    """Every corpus location the config names, by key (``data.mixture[1].path`` …)."""
    found = {"data.train": data_cfg.train}
    if data_cfg.eval:
        found["data.eval"] = data_cfg.eval
    for i, item in enumerate(data_cfg.mixture or []):
        if isinstance(item, dict) and (item.get("path") or item.get("name")):
            found[f"data.mixture[{i}].path"] = str(item.get("path") or item.get("name"))
    return found


def check_locations(data_cfg: Any) -> None:
    """ConfigError for a URL that carries credentials (before config.yaml is written)."""
    for key, location in corpus_locations(data_cfg).items():
        try:
            storage.check_no_credentials(location, key)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
