"""Attention backends, chosen once when a model is built and logged.

Every backend takes q of shape (B, nh, T, hs) and k, v of shape (B, nkv, T, hs), where nkv divides
nh (grouped-query attention; nkv == nh is plain multi-head), and returns (B, nh, T, hs):

- ``flash_attn``: the FlashAttention-2 package (CUDA, compute capability >= 8.0, fp16/bf16).
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``. On CUDA it is pinned to the
  FlashAttention kernel (FLASH + memory-efficient in fp32, where FLASH cannot run), so a shape or
  dtype that would need the slow math kernel fails loudly instead of silently running slow.
- ``eager``: an explicit softmax(q kᵀ / √hs) v, the reference the others are tested against.

``flash_attn`` groups kv heads natively; ``sdpa`` and ``eager`` repeat each kv head nh / nkv times
first (SDPA's own ``enable_gqa`` is not supported by every CUDA kernel it is pinned to).

On CPU ``auto`` picks ``sdpa`` rather than ``eager`` (a deliberate departure from DESIGN.md):
PyTorch's fused CPU kernel gives the same numbers as the explicit softmax, runs its forward 4-8x
faster (T=512-2048, 2 cores; training is on par, its backward dominates) and never holds a (T, T)
score matrix.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatrain.errors import ConfigError
from megatrain.models.common.rotary import apply_rotary

logger = logging.getLogger(__name__)

ATTN_IMPLS = ("auto", "flash_attn", "sdpa", "eager")
_HALF = (torch.float16, torch.bfloat16)
_CUDA_HALF_KERNELS = [SDPBackend.FLASH_ATTENTION]
_CUDA_FP32_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

# (q, k, v, causal, dropout_p) -> out; q and out are (B, nh, T, hs), k and v (B, nkv, T, hs)
AttentionFn = Callable[[Tensor, Tensor, Tensor, bool, float], Tensor]


@functools.lru_cache(maxsize=1)
def _flash_attn_func() -> Callable[..., Any] | str:
    """The flash_attn kernel, or why it cannot be imported."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        if getattr(e, "name", None) == "flash_attn":
            return "the flash_attn package is not installed (pip install megatrain[flash])"
        return f"the flash_attn package failed to import ({e})"
    except OSError as e:  # a wheel built against another CUDA / torch
        return f"the flash_attn package failed to import ({e})"
    return flash_attn_func


def _cuda_problem(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"needs a CUDA GPU (the model is built for {device.type})"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    return None


def _ampere_problem(device: torch.device, what: str) -> str | None:
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"{what} needs compute capability >= 8.0; this GPU has {major}.{minor}"
    return None


def _flash_attn_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the flash_attn package cannot run here, or None when it can."""
    problem = _cuda_problem(device)
    if problem is None and isinstance(_flash_attn_func(), str):
        problem = _flash_attn_func()
    if problem is None:
        problem = _ampere_problem(device, "flash_attn")
    if problem is None and dtype not in _HALF:
        problem = f"needs fp16 or bf16, not {dtype}"
    return problem


def _sdpa_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why pinned SDPA cannot run here, or None when it can (CPU always can)."""
    if device.type != "cuda":
        return None
    problem = _cuda_problem(device)
    if problem is None and dtype in _HALF:
        problem = _ampere_problem(device, f"SDPA's FlashAttention kernel in {dtype}")
    return problem


def _auto(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """The fastest backend that can run here, and why it was picked."""
    flash_problem = _flash_attn_problem(device, dtype)
    if flash_problem is None:
        return "flash_attn", "flash_attn package on a supported GPU"
    if device.type != "cuda":
        return "sdpa", f"PyTorch's fused {device.type} kernel"
    sdpa_problem = _sdpa_problem(device, dtype)
    if sdpa_problem is not None:
        raise ConfigError(f"attn_impl=auto: no fast attention kernel can run: {sdpa_problem}; "
                          "set attn_impl=eager to accept the slow path")
    if dtype in _HALF:
        return "sdpa", f"SDPA pinned to its FlashAttention kernel (flash_attn: {flash_problem})"
    return "sdpa", (f"SDPA with FlashAttention + memory-efficient kernels: {dtype} cannot use "
                    "the FlashAttention kernel alone")


def resolve_attn_impl(requested: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """Turn ``auto | flash_attn | sdpa | eager`` into a backend that runs on ``device``.

    ``dtype`` is the dtype attention computes in (the autocast dtype when autocast is on). Called
    once at build time so a backend that cannot run fails before training starts.
    """
    if requested not in ATTN_IMPLS:
        raise ConfigError(f"attn_impl={requested} is not an attention backend; "
                          f"valid: {', '.join(ATTN_IMPLS)}")
    device = torch.device(device)
    if requested == "auto":
        impl, why = _auto(device, dtype)
    else:
        checks = {"flash_attn": _flash_attn_problem, "sdpa": _sdpa_problem}
        problem = checks[requested](device, dtype) if requested in checks else None
        if problem is not None:
            raise ConfigError(f"attn_impl={requested}: {problem}")
        impl, why = requested, "as requested"
    logger.info("attention backend: %s (%s; device=%s, dtype=%s)", impl, why, device, dtype)
    return impl


def repeat_kv(kv: Tensor, n_heads: int) -> Tensor:
    """(B, nkv, T, hs) -> (B, nh, T, hs): kv head j serves query heads j·g .. j·g + g - 1."""
    groups = n_heads // kv.size(1)
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def eager_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float = 0.0
) -> Tensor:
    """The explicit reference: softmax(q kᵀ / √hs) v, the softmax taken in fp32."""
    T, hs = q.size(-2), q.size(-1)
    k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))  # (B, nh, T, hs)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
        att = att.masked_fill(future, float("-inf"))
    att = F.softmax(att.float(), dim=-1).to(q.dtype)
    att = F.dropout(att, p=dropout_p, training=dropout_p > 0)
    return att @ v  # (B, nh, T, hs)


def sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float = 0.0
) -> Tensor:
    """PyTorch SDPA; on CUDA pinned to the FlashAttention kernel so it never falls to math."""
    k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))  # (B, nh, T, hs)
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    kernels = _CUDA_HALF_KERNELS if q.dtype in _HALF else _CUDA_FP32_KERNELS
    with sdpa_kernel(kernels):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float = 0.0
) -> Tensor:
    """The flash_attn package, which wants (B, T, nh, hs) and takes fewer kv heads as they are."""
    flash_attn_func = _flash_attn_func()
    assert not isinstance(flash_attn_func, str), flash_attn_func  # resolve_attn_impl checked
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          dropout_p=dropout_p, causal=causal)  # (B, T, nh, hs)
    return out.transpose(1, 2)  # (B, nh, T, hs)


_BACKENDS: dict[str, AttentionFn] = {
    "flash_attn": flash_attention,
    "sdpa": sdpa_attention,
    "eager": eager_attention,
}


def make_attention_fn(impl: str) -> AttentionFn:
    """The attention function of a resolved backend (not ``auto``: resolve it first)."""
    if impl not in _BACKENDS:
        raise ConfigError(f"attn_impl={impl} is not a resolved attention backend; "
                          f"valid: {', '.join(_BACKENDS)} (resolve 'auto' with resolve_attn_impl)")
    return _BACKENDS[impl]


class CausalSelfAttention(nn.Module):
    """Multi-head or grouped-query causal self-attention with a fused q/k/v projection.

    ``rope`` (the (cos, sin) of ``megatrain.models.common.rotary``) rotates q and k when given;
    GPT-2 passes none (its positions are learned and added to the input).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, attn_impl: str,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        assert d_model % n_heads == 0 and n_heads % n_kv_heads == 0
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.attn_impl = attn_impl
        self.attn_fn = make_attention_fn(attn_impl)
        kv_dim = n_kv_heads * self.head_dim
        self.split = (d_model, kv_dim, kv_dim)
        self.qkv = nn.Linear(d_model, d_model + 2 * kv_dim, bias=bias)  # fused q, k, v
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(self.split, dim=2)  # (B, T, C), 2 x (B, T, nkv·hs)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        y = self.attn_fn(q, k, v, True, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, attn_impl={self.attn_impl}"
