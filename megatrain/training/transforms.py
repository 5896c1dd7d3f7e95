"""Training-time transformations of a plain model, applied in one fixed order.

Models know nothing about distribution: activation checkpointing and ``torch.compile`` are
applied here, in place (parameter names stay as the model defines them, so checkpoints load
into a plain model), then DeepSpeed wraps the result.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger("megatrain")


def checkpoint_activations(block: nn.Module) -> None:
    """Recompute ``block``'s activations in backward instead of keeping them."""
    forward = block.forward

    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        if not block.training:
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed_forward


def apply_transforms(model: nn.Module, activation_checkpointing: bool, compile: bool) -> nn.Module:
    """Activation checkpointing per block, then ``torch.compile`` per block."""
    for block in model.blocks:
        if activation_checkpointing:
            checkpoint_activations(block)
        if compile:
            block.compile()
    if activation_checkpointing or compile:
        log.info("model transforms: activation checkpointing=%s, compile=%s over %d blocks",
                 activation_checkpointing, compile, len(model.blocks))
    return model
