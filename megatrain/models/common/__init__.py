"""Building blocks shared by model families: attention, norms, MLPs, positions, the model base."""

from megatrain.models.common.attention import (
    ATTN_IMPLS,
    AttentionFn,
    AttnMask,
    CrossAttention,
    SelfAttention,
    make_attention_fn,
    resolve_attn_impl,
)
from megatrain.models.common.base import ModelBase, TransformerConfig
from megatrain.models.common.layers import Block, GatedMLP, GeluMLP, RMSNorm
from megatrain.models.common.positions import (
    batch_mask,
    positions_in_documents,
    token_positions,
)
from megatrain.models.common.rotary import apply_rotary, rotary_cos_sin

__all__ = [
    "ATTN_IMPLS",
    "AttentionFn",
    "AttnMask",
    "Block",
    "CrossAttention",
    "GatedMLP",
    "GeluMLP",
    "ModelBase",
    "RMSNorm",
    "SelfAttention",
    "TransformerConfig",
    "apply_rotary",
    "batch_mask",
    "make_attention_fn",
    "positions_in_documents",
    "resolve_attn_impl",
    "rotary_cos_sin",
    "token_positions",
]
