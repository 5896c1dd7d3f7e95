"""The T5 family's registry entry: named sizes (Google's T5 v1.1 shapes), objective, FLOPs,
memory facts and Hugging Face adapter."""

from __future__ import annotations

from megatrain.models.spec import ActivationShape, ModelSpec
from megatrain.models.t5.hf import T5_ADAPTER
from megatrain.models.t5.model import T5Config, build_t5, t5_flops_per_token


def _t5_size(n_layers: int, d_model: int, n_heads: int, head_dim: int, d_ff: int,
             max_seq_len: int = 512) -> dict:
    return {"n_layers": n_layers, "n_decoder_layers": n_layers, "d_model": d_model,
            "n_heads": n_heads, "head_dim": head_dim, "d_ff": d_ff, "max_seq_len": max_seq_len}


T5_SPEC = ModelSpec(
    family="t5",
    sizes={
        "t5-tiny": _t5_size(2, 128, 4, 32, 320),  # CPU tests and the quickstart
        # google/t5-v1_1-{small,base,large}; with their 32128-token vocabulary 77.0M, 247.6M and
        # 783.2M parameters (the untied head included), as transformers counts them.
        "t5-small": _t5_size(8, 512, 6, 64, 1024),
        "t5-base": _t5_size(12, 768, 12, 64, 2048),
        "t5-large": _t5_size(24, 1024, 16, 64, 2816),
    },
    config_cls=T5Config,
    build=build_t5,
    objective="span",
    flops_per_token=t5_flops_per_token,
    # after each stack: the final RMSNorm's input and the head's input; a decoder stack with
    # cross-attention
    activations=ActivationShape(norm="rms", gated=True, head_norms=1, head_units=1,
                                encoder_decoder=True),
    hf=T5_ADAPTER,
)
