"""GPT family: GPT-2 and Llama-style."""

from megatrain.models.gpt.llama import Llama, LlamaConfig, build_llama, llama_flops_per_token
from megatrain.models.gpt.model import GPT, GPTConfig, build_gpt, gpt_flops_per_token

__all__ = [
    "GPT",
    "GPTConfig",
    "Llama",
    "LlamaConfig",
    "build_gpt",
    "build_llama",
    "gpt_flops_per_token",
    "llama_flops_per_token",
]
