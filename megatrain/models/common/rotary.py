"""Rotary position embeddings (RoPE) in Hugging Face Llama's "rotate half" layout.

Each head's dims are paired (i, i + hs/2) rather than (2i, 2i + 1), as in ``transformers``'
Llama, so Hugging Face q/k projection weights load without a permutation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """(cos, sin) of the angles pos · θ^(-2i/hs), each (T, hs), in fp32.

    Computed per forward rather than held as buffers: it is tiny, and a model built on the meta
    device then has no buffers to re-initialise.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    pos = torch.arange(seq_len, device=device).float()  # (T,)
    freqs = torch.outer(pos, inv_freq)  # (T, hs/2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, nh, T, hs) by the angles of its positions; cos and sin are (T, hs)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin
