"""GPT-2 (``model.family=gpt``): learned positions, pre-LayerNorm blocks, tied embeddings."""

from megatrain.models.gpt2.model import GPT, GPTConfig, build_gpt, gpt_flops_per_token

__all__ = ["GPT", "GPTConfig", "build_gpt", "gpt_flops_per_token"]
