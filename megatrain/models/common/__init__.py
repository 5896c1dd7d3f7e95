"""Building blocks shared by model families."""

from megatrain.models.common.attention import (
    ATTN_IMPLS,
    AttentionFn,
    make_attention_fn,
    resolve_attn_impl,
)

__all__ = ["ATTN_IMPLS", "AttentionFn", "make_attention_fn", "resolve_attn_impl"]
