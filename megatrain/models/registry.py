"""One registry: ``model.family`` + a named size -> a spec with everything the trainer needs.

Each family lives in its own folder (``models/<family>/``: model, spec, HF adapter); this module
lists them and looks them up. The dims of every named size live in the family's spec and only
there; ``configs/model/*.yaml`` name a size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatrain.config.schema import ModelConfig
from megatrain.errors import ConfigError
from megatrain.models.bert.spec import BERT_SPEC
from megatrain.models.common.attention import ATTN_IMPLS
from megatrain.models.common.heads import fit_heads
from megatrain.models.common.hf import StateDict, import_transformers, read_hf_weights
from megatrain.models.gpt2.spec import GPT_SPEC
from megatrain.models.llama.spec import LLAMA_SPEC
from megatrain.models.spec import ModelSpec
from megatrain.models.t5.spec import T5_SPEC

__all__ = ["MODEL_SPECS", "ModelSpec", "build_model", "check_heads", "get_model_spec",
           "load_hf_pretrained", "resolve_model_config", "spec_for_config", "with_heads"]

logger = logging.getLogger(__name__)

# model.family -> its spec: one line per family folder (models/<family>/spec.py).
MODEL_SPECS: dict[str, ModelSpec] = {spec.family: spec for spec in (
    GPT_SPEC,
    LLAMA_SPEC,
    BERT_SPEC,
    T5_SPEC,
)}

# Keys of model config that choose a spec or a starting point rather than a dimension.
_NOT_DIMS = frozenset({"family", "size", "init_from"})


def get_model_spec(family: str) -> ModelSpec:
    if family not in MODEL_SPECS:
        raise ConfigError(f"model.family={family} is not a model family; "
                          f"valid: {', '.join(MODEL_SPECS)}")
    return MODEL_SPECS[family]


def spec_for_config(config: Any) -> ModelSpec:
    """The spec whose config class ``config`` is an instance of (e.g. a loaded checkpoint's)."""
    for spec in MODEL_SPECS.values():
        if isinstance(config, spec.config_cls):
            return spec
    raise ConfigError(f"{type(config).__name__} is not the config of a registered model family")


def _as_dict(cfg: Mapping[str, Any] | ModelConfig) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    return {key: cfg[key] for key in cfg}


def _size_fields(spec: ModelSpec, size: str | None) -> dict[str, Any]:
    if size is None:
        return {}
    if size not in spec.sizes:
        raise ConfigError(f"model.size={size} is not a {spec.family} size; "
                          f"valid: {', '.join(spec.sizes)}")
    return dict(spec.sizes[size])


def resolve_model_config(cfg: Mapping[str, Any] | ModelConfig, vocab_size: int) -> Any:
    """The family's config: the named size's dims, overridden by every explicit (non-None) field.

    ``vocab_size`` (the tokenizer's) is used unless ``cfg`` sets ``vocab_size`` itself.
    """
    values = _as_dict(cfg)
    spec = get_model_spec(values.get("family", "gpt"))
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(k for k, v in values.items() if k not in fields | _NOT_DIMS and v is not None)
    if unknown:
        raise ConfigError(f"model.{unknown[0]} is not a setting of the {spec.family} family; "
                          f"valid: {', '.join(sorted(fields))}")
    merged = _size_fields(spec, values.get("size"))
    merged.update({k: v for k, v in values.items() if k in fields and v is not None})
    merged.setdefault("vocab_size", vocab_size)
    missing = [f.name for f in dataclasses.fields(spec.config_cls)
               if f.name not in merged and f.default is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"model: no size given and {', '.join(missing)} not set; "
                          f"name a size ({', '.join(spec.sizes)}) or set them")
    config = spec.config_cls(**merged)
    _validate(config)
    return config


def _validate(config: Any) -> None:
    for name in ("n_layers", "d_model", "n_heads", "d_ff", "vocab_size", "max_seq_len"):
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"model.{name}={value} must be a positive integer")
    if getattr(config, "head_dim", None) is None and config.d_model % config.n_heads:
        raise ConfigError(f"model.d_model={config.d_model} is not divisible by "
                          f"model.n_heads={config.n_heads}")
    n_kv_heads = getattr(config, "n_kv_heads", config.n_heads)
    if not isinstance(n_kv_heads, int) or n_kv_heads <= 0 or config.n_heads % n_kv_heads:
        raise ConfigError(f"model.n_kv_heads={n_kv_heads} must be a positive divisor of "
                          f"model.n_heads={config.n_heads}")
    if hasattr(config, "rope_theta") and (config.d_model // config.n_heads) % 2:
        raise ConfigError(f"rotary positions need an even head dim, not "
                          f"{config.d_model // config.n_heads} (model.d_model / model.n_heads)")
    if config.attn_impl not in ATTN_IMPLS:
        raise ConfigError(f"model.attn_impl={config.attn_impl} is not an attention backend; "
                          f"valid: {', '.join(ATTN_IMPLS)}")
    if not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"model.dropout={config.dropout} must be in [0, 1)")


HEAD_FIELDS = ("num_labels", "nsp")  # the task heads a family's config may have (BERT's)


def has_heads(family: str) -> bool:
    """Whether ``family``'s models can have task heads (a classifier, BERT's NSP head)."""
    fields = {f.name for f in dataclasses.fields(get_model_spec(family).config_cls)}
    return set(HEAD_FIELDS) <= fields


def check_heads(family: str, num_labels: int = 0, nsp: bool = False) -> None:
    """ConfigError when a run's data asks ``family`` for task heads it does not have."""
    if (num_labels or nsp) and not has_heads(family):
        what = "data.objective=cls" if num_labels else "data.nsp"
        raise ConfigError(f"{what} needs a model with a pooled [CLS] head (model.family=bert); "
                          f"model.family={family} has none")


def with_heads(config: Any, *, num_labels: int = 0, nsp: bool = False) -> Any:
    """``config`` with the task heads a run's data asks for: a classifier over ``num_labels``
    classes (data.objective=cls) or the next-sentence head (data.nsp), else the plain model. A
    family without such heads asked for one is a ConfigError."""
    family = spec_for_config(config).family
    check_heads(family, num_labels, nsp)
    if not has_heads(family):
        return config
    return dataclasses.replace(config, num_labels=num_labels, nsp=nsp)


def build_model(
    cfg: Mapping[str, Any] | ModelConfig,
    vocab_size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, ModelSpec, Any]:
    """Resolve ``cfg`` and build the model on ``device`` in ``dtype``: (model, spec, config)."""
    config = resolve_model_config(cfg, vocab_size)
    spec = get_model_spec(_as_dict(cfg).get("family", "gpt"))
    model = spec.build(config, device, dtype)
    n = sum(p.numel() for p in model.parameters())
    logger.info("model: %s %s, %.1fM parameters", spec.family, config, n / 1e6)
    return model, spec, config


def load_hf_pretrained(directory: str | Path,
                       weights: bool = True) -> tuple[str, Any, StateDict | None]:
    """(family, config, state_dict) of a Hugging Face model directory, in megatrain's terms.

    The family comes from config.json's ``model_type``, the heads from its ``architectures``;
    the state dict loads into ``get_model_spec(family).build(config, ...)`` with ``strict=True``
    (heads the weights carry beyond the config's are left out; a head they lack is missing, for
    ``models.common.heads.load_fitted`` to keep fresh).
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory} is not a Hugging Face model directory (no config.json)")
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    specs = {spec.hf.model_type: spec for spec in MODEL_SPECS.values() if spec.hf is not None}
    if model_type not in specs:
        raise ConfigError(f"{directory}: model_type={model_type} has no megatrain adapter; "
                          f"valid: {', '.join(specs)}")
    spec = specs[model_type]
    hf_config = import_transformers().AutoConfig.from_pretrained(directory)
    try:
        config = spec.hf.config_from_hf(hf_config)
    except ValueError as e:
        raise ConfigError(f"{directory}: {e}") from e
    if not weights:  # the config alone (a resumed run takes its weights from the checkpoint)
        return spec.family, config, None
    state_dict = spec.hf.state_dict_from_hf(read_hf_weights(directory))
    model = spec.build(config, "meta", torch.float32)  # its names and shapes, for free
    return spec.family, config, fit_heads(model, state_dict, str(directory))[0]
