"""What the registry knows of a model family: one ``ModelSpec`` per family folder
(``models/<family>/spec.py``), so adding a family is a folder and a registry line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megatrain.models.common.hf import HFAdapter


@dataclass(frozen=True)
class ActivationShape:
    """What the memory planner needs to know of a family's blocks (``training/memory_plan.py``):
    its norm (``layer`` | ``rms``), whether its MLP is gated (SwiGLU, gated GELU), the tensors
    kept after the last block per token — ``head_norms`` norms' worth plus ``head_units`` × d —
    and whether it has a decoder stack with cross-attention (T5)."""

    norm: str
    gated: bool
    head_norms: int
    head_units: int
    encoder_decoder: bool = False


@dataclass(frozen=True)
class ModelSpec:
    family: str
    sizes: dict[str, dict[str, Any]]  # size name -> config_cls fields (vocab_size comes later)
    config_cls: type
    build: Callable[[Any, torch.device | str, torch.dtype], nn.Module]  # (config, device, dtype)
    objective: str  # the data objective it trains on: clm | mlm | span
    flops_per_token: Callable[[Any, int], float]  # (config, seq_len) -> training FLOPs
    activations: ActivationShape
    hf: HFAdapter | None = None

    @property
    def generates(self) -> bool:
        """Whether the family generates text (decoders and encoder–decoders; not MLM)."""
        return self.objective != "mlm"


def mlp4x_size(n_layers: int, d_model: int, n_heads: int, max_seq_len: int) -> dict:
    """A named size's dims for GPT-2 and BERT shapes: the MLP is 4× the model width."""
    return {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "d_ff": 4 * d_model,
            "max_seq_len": max_seq_len}
