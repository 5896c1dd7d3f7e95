"""The GPT-2 family's registry entry (``model.family=gpt``): named sizes, objective, FLOPs,
memory facts and Hugging Face adapter."""

from __future__ import annotations

from megatrain.models.gpt2.hf import GPT2_ADAPTER
from megatrain.models.gpt2.model import GPTConfig, build_gpt, gpt_flops_per_token
from megatrain.models.spec import ActivationShape, ModelSpec, mlp4x_size


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
    # after the blocks: ln_f's input and lm_head's input
    activations=ActivationShape(norm="layer", gated=False, head_norms=1, head_units=1),
    hf=GPT2_ADAPTER,
)
