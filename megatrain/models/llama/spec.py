"""The Llama family's registry entry: named sizes, objective, FLOPs, memory facts and Hugging
Face adapter."""

from __future__ import annotations

from megatrain.models.llama.hf import LLAMA_ADAPTER
from megatrain.models.llama.model import LlamaConfig, build_llama, llama_flops_per_token
from megatrain.models.spec import ActivationShape, ModelSpec


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
    # after the blocks: the final RMSNorm's input and lm_head's input
    activations=ActivationShape(norm="rms", gated=True, head_norms=1, head_units=1),
    hf=LLAMA_ADAPTER,
)
