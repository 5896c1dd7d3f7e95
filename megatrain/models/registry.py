"""One registry: ``model.family`` + a named size -> a spec with everything the trainer needs.

The dims of every named size live here and only here; ``configs/model/*.yaml`` name a size.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from megatrain.config.schema import ModelConfig
from megatrain.errors import ConfigError
from megatrain.models.bert.spec import BERT_SPEC
from megatrain.models.common.attention import ATTN_IMPLS
from megatrain.models.gpt.llama import LlamaConfig, build_llama, llama_flops_per_token
from megatrain.models.gpt.model import GPTConfig, build_gpt, gpt_flops_per_token
from megatrain.models.hf.gpt2 import GPT2_ADAPTER
from megatrain.models.hf.llama import LLAMA_ADAPTER
from megatrain.models.spec import ModelSpec, mlp4x_size
from megatrain.models.t5.spec import T5_SPEC

__all__ = ["MODEL_SPECS", "ModelSpec", "build_model", "get_model_spec", "resolve_model_config",
           "spec_for_config"]

logger = logging.getLogger(__name__)


def _gpt2_size(n_layers: int, d_model: int, n_heads: int, max_seq_len: int = 1024) -> dict:
    return mlp4x_size(n_layers, d_model, n_heads, max_seq_len)


GPT_SPEC = ModelSpec(
    family="gpt",
    sizes={
        # CPU tests and the quickstart: on 2 CPU cores training is bound by tokens seen, so
        # a small width learns most in a few minutes (~1.3M parameters with a 4096 vocabulary).
        "gpt2-tiny": _gpt2_size(4, 128, 4, max_seq_len=512),
        "gpt2-small": _gpt2_size(12, 768, 12),  # 124M with the GPT-2 vocabulary
        "gpt2-medium": _gpt2_size(24, 1024, 16),  # 350M
        "gpt2-large": _gpt2_size(36, 1280, 20),  # 774M
        "gpt2-xl": _gpt2_size(48, 1600, 25),  # 1.5B
    },
    config_cls=GPTConfig,
    build=build_gpt,
    objective="clm",
    flops_per_token=gpt_flops_per_token,
    hf=GPT2_ADAPTER,
)



def _llama_size(n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, d_ff: int,
                max_seq_len: int, rope_theta: float = 10000.0, tie: bool = False) -> dict:
    return {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads,
            "n_kv_heads": n_kv_heads, "d_ff": d_ff, "max_seq_len": max_seq_len,
            "rope_theta": rope_theta, "tie_embeddings": tie}


LLAMA_SPEC = ModelSpec(
    family="llama",
    sizes={
        "llama-tiny": _llama_size(4, 128, 4, 2, 384, 512),  # CPU tests; GQA with 2 groups
        # Llama-3.2's shapes (tied head, θ = 500000; its 128k-context RoPE scaling is not
        # modelled, so the context is kept at 2048) and Llama-2-7B's (6.74B with 32000 tokens).
        "llama-1b": _llama_size(16, 2048, 32, 8, 8192, 2048, rope_theta=500000.0, tie=True),
        "llama-3b": _llama_size(28, 3072, 24, 8, 8192, 2048, rope_theta=500000.0, tie=True),
        "llama-7b": _llama_size(32, 4096, 32, 32, 11008, 4096),
    },
    config_cls=LlamaConfig,
    build=build_llama,
    objective="clm",
    flops_per_token=llama_flops_per_token,
    hf=LLAMA_ADAPTER,
)

MODEL_SPECS: dict[str, ModelSpec] = {spec.family: spec for spec in (GPT_SPEC, LLAMA_SPEC, BERT_SPEC,
                                                                      T5_SPEC)}

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
