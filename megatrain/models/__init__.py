"""Model zoo: families, the registry that names them, attention backends, FLOPs, generation."""

from megatrain.models.flops import mfu, palm_flops_per_token, peak_tflops_for
from megatrain.models.generation import generate
from megatrain.models.gpt2 import GPT, GPTConfig
from megatrain.models.llama import Llama, LlamaConfig
from megatrain.models.registry import (
    MODEL_SPECS,
    ModelSpec,
    build_model,
    get_model_spec,
    resolve_model_config,
    spec_for_config,
)

__all__ = [
    "GPT",
    "MODEL_SPECS",
    "GPTConfig",
    "Llama",
    "LlamaConfig",
    "ModelSpec",
    "build_model",
    "generate",
    "get_model_spec",
    "mfu",
    "palm_flops_per_token",
    "peak_tflops_for",
    "resolve_model_config",
    "spec_for_config",
]
