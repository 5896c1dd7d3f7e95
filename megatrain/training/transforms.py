"""Training-time transformations of a plain model, applied in one fixed order.

Models know nothing about distribution: activation checkpointing, FP8 linears and
``torch.compile`` are applied here, in place (parameter names stay as the model defines them, so
checkpoints load into a plain model), then DeepSpeed wraps the result.

``trainer.compile`` compiles each transformer block on its own (regional compilation: the
blocks are alike, so one compiled graph serves them all, compiling takes seconds rather than
the minutes of a whole-model graph, and the embeddings, loss and data-dependent code stay
eager). ``auto`` turns it on for CUDA under ZeRO 0-2 and off on a CPU (inductor's CPU code is
slower to build than it saves on short CPU runs) and under ZeRO-3 (its parameter hooks
partition weights inside the compiled region).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatrain.errors import ConfigError

log = logging.getLogger("megatrain")
COMPILE_SETTINGS = ("auto", "on", "off")
# how OmegaConf hands over a str key set to true/false (or YAML's on/off)
_COMPILE_ALIASES = {"true": "on", "false": "off"}


def resolve_compile(setting: str | bool, device: torch.device, zero_stage: int = 0) -> bool:
    """Whether ``trainer.compile`` (auto | on | off; true/false too) compiles the blocks:
    ``auto`` is on for CUDA under ZeRO 0-2, off on a CPU and under ZeRO-3."""
    value = str(setting).lower()
    value = _COMPILE_ALIASES.get(value, value)
    if value not in COMPILE_SETTINGS:
        raise ConfigError(f"trainer.compile={setting!r} is not one of "
                          f"{', '.join(COMPILE_SETTINGS)}")
    if value == "auto":
        on = torch.device(device).type == "cuda" and zero_stage < 3
        log.info("trainer.compile=auto: %s (%s, ZeRO %d)", "compiling each block" if on
                 else "eager", torch.device(device).type, zero_stage)
        return on
    return value == "on"


def checkpoint_activations(block: nn.Module) -> None:
    """Recompute ``block``'s activations in backward instead of keeping them."""
    forward = block.forward

    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        if not block.training:
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed_forward


def apply_transforms(model: nn.Module, activation_checkpointing: bool, compile: bool,
                     fp8: bool = False) -> nn.Module:
    """FP8 linears in the blocks (``trainer.fp8``), then activation checkpointing per block, then
    ``torch.compile`` per block."""
    if fp8:
        from megatrain.training.fp8 import apply_fp8

        apply_fp8(model, next(model.parameters()).device)
    for block in model.blocks:
        if activation_checkpointing:
            checkpoint_activations(block)
        if compile:
            block.compile()
    if activation_checkpointing or compile:
        log.info("model transforms: activation checkpointing=%s, compile=%s over %d blocks",
                 activation_checkpointing, compile, len(model.blocks))
    return model
