"""Rotary position embeddings (RoPE) in Hugging Face Llama's "rotate half" layout.

Each head's dims are paired (i, i + hs/2) rather than (2i, 2i + 1), as in ``transformers``'
Llama, so Hugging Face q/k projection weights load without a permutation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device | str,
    positions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(cos, sin) of the angles pos · θ^(-2i/hs) in fp32: each (T, hs) for positions 0..T-1, or
    (B, 1, T, hs) for ``positions`` (B, T) (restarting per packed document).

    Computed per forward rather than held as buffers: it is tiny, and a model built on the meta
    device then has no buffers to re-initialise.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    pos = torch.arange(seq_len, device=device) if positions is None else positions
    freqs = pos.float()[..., None] * inv_freq  # (T, hs/2) or (B, T, hs/2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (T, hs) or (B, T, hs)
    if positions is not None:
        angles = angles.unsqueeze(1)  # (B, 1, T, hs): broadcast over heads
    return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, nh, T, hs) by the angles of its positions; cos and sin are (T, hs) or
    (B, 1, T, hs)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin
