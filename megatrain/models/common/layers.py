"""Norms, MLPs and the pre-norm transformer block shared by the model families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatrain.models.common.attention import AttnMask, LayerKV


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in fp32 and cast back (as Hugging Face Llama does)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


class GeluMLP(nn.Module):
    """fc -> GELU -> proj, with biases: GPT-2 uses GELU's tanh approximation (``"tanh"``), BERT
    the exact erf form (``"none"``)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0,
                 approximate: str = "tanh") -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


GATES = {"silu": F.silu, "gelu_tanh": _gelu_tanh}


class GatedMLP(nn.Module):
    """proj(act(gate(x)) · fc(x)), no biases: SwiGLU (``"silu"``, Llama) or gated GELU
    (``"gelu_tanh"``, T5 v1.1: HF's wi_0, wi_1, wo). Dropout on the output, and with
    ``hidden_dropout`` also on the gated hidden state (T5 has both; Llama only the output's)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0,
                 activation: str = "silu", hidden_dropout: bool = False) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.fc = nn.Linear(d_model, d_ff, bias=False)
        self.proj = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.hidden_dropout = hidden_dropout
        self.act = GATES[activation]

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.gate(x)) * self.fc(x)  # (B, T, ff)
        return self.dropout(self.proj(self.dropout(h) if self.hidden_dropout else h))


class Block(nn.Module):
    """One pre-norm transformer block; the unit that activation checkpointing wraps.

    The model picks the norms, attention and MLP; ``rope``, ``mask`` and a generation's
    ``cache`` (its layer of a :class:`KVCache`) are passed through to the attention.
    """

    def __init__(self, ln_1: nn.Module, attn: nn.Module, ln_2: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                mask: AttnMask | None = None, cache: LayerKV | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, mask, cache)
        return x + self.mlp(self.ln_2(x))
