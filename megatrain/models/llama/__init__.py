"""Llama-style GPT (``model.family=llama``): RoPE, RMSNorm, SwiGLU, grouped-query attention."""

from megatrain.models.llama.model import Llama, LlamaConfig, build_llama, llama_flops_per_token

__all__ = ["Llama", "LlamaConfig", "build_llama", "llama_flops_per_token"]
