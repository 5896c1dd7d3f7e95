"""GPT-2 family."""

from megatrain.models.gpt.model import GPT, GPTConfig, build_gpt, gpt_flops_per_token

__all__ = ["GPT", "GPTConfig", "build_gpt", "gpt_flops_per_token"]
