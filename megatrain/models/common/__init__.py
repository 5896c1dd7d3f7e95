"""Building blocks shared by model families: attention, norms, MLPs, rotary positions."""

from megatrain.models.common.attention import (
    ATTN_IMPLS,
    AttentionFn,
    CausalSelfAttention,
    make_attention_fn,
    resolve_attn_impl,
)
from megatrain.models.common.layers import Block, GeluMLP, RMSNorm, SwiGLU
from megatrain.models.common.rotary import apply_rotary, rotary_cos_sin

__all__ = [
    "ATTN_IMPLS",
    "AttentionFn",
    "Block",
    "CausalSelfAttention",
    "GeluMLP",
    "RMSNorm",
    "SwiGLU",
    "apply_rotary",
    "make_attention_fn",
    "resolve_attn_impl",
    "rotary_cos_sin",
]
