"""What the registry knows of a model family (its own module, so family packages can define
their spec without importing the registry)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megatrain.models.hf import HFAdapter


@dataclass(frozen=True)
class ModelSpec:
    family: str
    sizes: dict[str, dict[str, Any]]  # size name -> config_cls fields (vocab_size comes later)
    config_cls: type
    build: Callable[[Any, torch.device | str, torch.dtype], nn.Module]  # (config, device, dtype)
    objective: str  # the data objective it trains on: clm | mlm | span
    flops_per_token: Callable[[Any, int], float]  # (config, seq_len) -> training FLOPs
    hf: HFAdapter | None = None


def mlp4x_size(n_layers: int, d_model: int, n_heads: int, max_seq_len: int) -> dict:
    """A named size's dims for GPT-2 and BERT shapes: the MLP is 4× the model width."""
    return {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "d_ff": 4 * d_model,
            "max_seq_len": max_seq_len}
