"""Attention backends, chosen once when a model is built and logged.

Every backend takes q of shape (B, nh, Tq, hs) and k, v of shape (B, nkv, Tk, hs), where nkv
divides nh (grouped-query attention; nkv == nh is plain multi-head), plus an optional
:class:`AttnMask` (padding, document boundaries, an additive bias), and returns (B, nh, Tq, hs):

- ``flash_attn``: the FlashAttention-2 package (CUDA, compute capability >= 8.0, fp16/bf16); its
  varlen API serves padding and document masks. It cannot add a bias (T5).
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``. On CUDA it is pinned to the
  FlashAttention kernel (FLASH + memory-efficient in fp32, where FLASH cannot run; memory-efficient
  when a mask is given, which FLASH cannot take), so a shape or dtype that would need the slow
  math kernel fails loudly instead of silently running slow.
- ``cudnn``: SDPA with cuDNN's fused attention tried first, then the FlashAttention kernel (for a
  shape cuDNN refuses), never the math kernel; masked calls as ``sdpa``. ``auto`` picks it on
  Hopper and newer (compute capability >= 9.0) in fp16/bf16 without a bias when the flash_attn
  package is absent: there cuDNN's kernel (Hopper's own tensor-core instructions) is the faster
  one, while SDPA's FlashAttention-2 kernel is written for Ampere (PyTorch 2.5's release notes
  quote up to 75% over it on an H100); below 9.0 FlashAttention-2 stays. A documented rule,
  not a timed probe: the choice is known when the model is built and is logged once.
- ``flex``: FlexAttention (compiled; CUDA only, it has no backward on CPU): block-sparse masks
  and T5's bias in one kernel.
- ``eager``: an explicit softmax(q kᵀ · scale + mask) v, the reference the others are tested
  against.

``flash_attn`` and ``flex`` group kv heads natively; ``sdpa`` and ``eager`` repeat each kv head
nh / nkv times first (SDPA's own ``enable_gqa`` is not supported by every CUDA kernel it is
pinned to).

On CPU ``auto`` picks ``sdpa`` rather than ``eager`` (a deliberate departure from DESIGN.md):
PyTorch's fused CPU kernel gives the same numbers as the explicit softmax, runs its forward 4-8x
faster (T=512-2048, 2 cores; training is on par, its backward dominates) and never holds a (T, T)
score matrix. A model whose attention carries a bias (T5) resolves ``auto`` to ``flex`` on CUDA.

Masked-out scores get the dtype's most negative finite value rather than -inf (as Hugging Face
does), so a query with nothing to attend to (a padding position) stays finite.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatrain.errors import ConfigError
from megatrain.models.common.rotary import apply_rotary

logger = logging.getLogger(__name__)

ATTN_IMPLS = ("auto", "flash_attn", "sdpa", "cudnn", "flex", "eager")
_HALF = (torch.float16, torch.bfloat16)
_CUDA_HALF_KERNELS = [SDPBackend.FLASH_ATTENTION]
_CUDA_CUDNN_KERNELS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]  # in this order
_CUDA_FP32_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
_CUDA_MASKED_KERNELS = [SDPBackend.EFFICIENT_ATTENTION]
CUDNN_MIN_CAPABILITY = (9, 0)  # auto prefers cuDNN attention from Hopper on


@dataclass
class AttnMask:
    """What restricts or shifts attention besides causality; built once per forward.

    ``key_padding`` (B, Tk) bool is True for real tokens. ``doc_ids`` (B, T) int (self-attention
    only) lets a query see only keys of its own document (packed sequences). ``bias`` (1 or B, nh,
    Tq, Tk) is added to the scores (T5's relative positions). Backends memoise what they derive
    from it (an additive mask, a block mask, a varlen layout) in ``derived``, so every layer of a
    forward — and its recomputation under activation checkpointing — reuses one copy.
    """

    key_padding: Tensor | None = None
    doc_ids: Tensor | None = None
    bias: Tensor | None = None
    derived: dict[tuple, Any] = field(default_factory=dict, repr=False, compare=False)

    def cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        if key not in self.derived:
            self.derived[key] = build()
        return self.derived[key]


class AttentionFn(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float = 0.0,
                 mask: AttnMask | None = None, scale: float | None = None) -> Tensor: ...


# --- resolution -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _flash_attn_module() -> Any:
    """The flash_attn module, or why it cannot be imported (a str)."""
    try:
        import flash_attn
    except ImportError as e:
        if getattr(e, "name", None) == "flash_attn":
            return "the flash_attn package is not installed (pip install megatrain[flash])"
        return f"the flash_attn package failed to import ({e})"
    except OSError as e:  # a wheel built against another CUDA / torch
        return f"the flash_attn package failed to import ({e})"
    return flash_attn


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


def _flash_attn_problem(device: torch.device, dtype: torch.dtype, bias: bool) -> str | None:
    """Why the flash_attn package cannot run here, or None when it can."""
    if bias:
        return "cannot add an attention bias (T5's relative positions); use flex, sdpa or eager"
    problem = _cuda_problem(device)
    if problem is None and isinstance(_flash_attn_module(), str):
        problem = _flash_attn_module()
    if problem is None:
        problem = _ampere_problem(device, "flash_attn")
    if problem is None and dtype not in _HALF:
        problem = f"needs fp16 or bf16, not {dtype}"
    return problem


def _sdpa_problem(device: torch.device, dtype: torch.dtype, bias: bool) -> str | None:
    """Why pinned SDPA cannot run here, or None when it can (CPU always can)."""
    if device.type != "cuda":
        return None
    problem = _cuda_problem(device)
    if problem is None and dtype in _HALF and not bias:
        problem = _ampere_problem(device, f"SDPA's FlashAttention kernel in {dtype}")
    return problem


def _cudnn_problem(device: torch.device, dtype: torch.dtype, bias: bool) -> str | None:
    """Why SDPA's cuDNN attention cannot run here, or None when it can."""
    if bias:
        return "cannot add an attention bias (T5's relative positions); use flex, sdpa or eager"
    problem = _cuda_problem(device)
    if problem is None and not torch.backends.cudnn.is_available():
        problem = "cuDNN is not available to this torch"
    if problem is None:
        problem = _ampere_problem(device, "cuDNN attention")
    if problem is None and dtype not in _HALF:
        problem = f"needs fp16 or bf16, not {dtype}"
    return problem


def cudnn_pays(capability: tuple[int, int], dtype: torch.dtype, bias: bool) -> bool:
    """The rule ``auto`` follows: cuDNN attention beats SDPA's FlashAttention-2 kernel on
    compute capability >= 9.0 in fp16/bf16 (cuDNN cannot add a bias)."""
    return tuple(capability) >= CUDNN_MIN_CAPABILITY and dtype in _HALF and not bias


def _flex_problem(device: torch.device, dtype: torch.dtype, bias: bool) -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as e:
        return f"FlexAttention is not in this torch ({torch.__version__}): {e}"
    return _cuda_problem(device) and "needs a CUDA GPU to train (it has no backward on CPU)"


def _auto(device: torch.device, dtype: torch.dtype, bias: bool) -> tuple[str, str]:
    """The fastest backend that can run here, and why it was picked."""
    flash_problem = _flash_attn_problem(device, dtype, bias)
    if flash_problem is None:
        return "flash_attn", "flash_attn package on a supported GPU"
    if device.type != "cuda":
        return "sdpa", f"PyTorch's fused {device.type} kernel"
    if bias and _flex_problem(device, dtype, bias) is None:
        return "flex", "FlexAttention: the attention carries a bias the flash kernels cannot add"
    sdpa_problem = _sdpa_problem(device, dtype, bias)
    if sdpa_problem is not None:
        raise ConfigError(f"attn_impl=auto: no fast attention kernel can run: {sdpa_problem}; "
                          "set attn_impl=eager to accept the slow path")
    capability = torch.cuda.get_device_capability(device)
    if cudnn_pays(capability, dtype, bias) and _cudnn_problem(device, dtype, bias) is None:
        return "cudnn", (f"SDPA with cuDNN attention first, then FlashAttention: compute "
                         f"capability {capability[0]}.{capability[1]} >= 9.0 "
                         f"(flash_attn: {flash_problem})")
    if dtype in _HALF:
        return "sdpa", f"SDPA pinned to its FlashAttention kernel (flash_attn: {flash_problem})"
    return "sdpa", (f"SDPA with FlashAttention + memory-efficient kernels: {dtype} cannot use "
                    "the FlashAttention kernel alone")


_PROBLEMS = {"flash_attn": _flash_attn_problem, "sdpa": _sdpa_problem,
             "cudnn": _cudnn_problem, "flex": _flex_problem}


def resolve_attn_impl(requested: str, device: torch.device | str, dtype: torch.dtype,
                      *, bias: bool = False) -> str:
    """Turn ``auto | flash_attn | sdpa | cudnn | flex | eager`` into a backend that runs on
    ``device``.

    ``dtype`` is the dtype attention computes in (the autocast dtype when autocast is on);
    ``bias`` says whether the model adds a bias to the scores (T5). Called once at build time so
    a backend that cannot run fails before training starts.
    """
    if requested not in ATTN_IMPLS:
        raise ConfigError(f"attn_impl={requested} is not an attention backend; "
                          f"valid: {', '.join(ATTN_IMPLS)}")
    device = torch.device(device)
    if requested == "auto":
        impl, why = _auto(device, dtype, bias)
    else:
        check = _PROBLEMS.get(requested)
        problem = check(device, dtype, bias) if check else None
        if problem is not None:
            raise ConfigError(f"attn_impl={requested}: {problem}")
        impl, why = requested, "as requested"
    logger.info("attention backend: %s (%s; device=%s, dtype=%s)", impl, why, device, dtype)
    return impl


# --- masks ------------------------------------------------------------------------------------


def repeat_kv(kv: Tensor, n_heads: int) -> Tensor:
    """(B, nkv, T, hs) -> (B, nh, T, hs): kv head j serves query heads j·g .. j·g + g - 1."""
    groups = n_heads // kv.size(1)
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def _allowed(mask: AttnMask | None, causal: bool, Tq: int, Tk: int,
             device: torch.device) -> Tensor | None:
    """Bool (B or 1, 1, Tq, Tk): which keys each query may see; None when all of them."""
    allowed = None
    if causal:  # the last Tq of Tk positions (Tq < Tk when generating with a prefix)
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(Tk - Tq)[None, None]
    if mask is not None and mask.key_padding is not None:
        pad = mask.key_padding.bool()[:, None, None, :]  # (B, 1, 1, Tk)
        allowed = pad if allowed is None else allowed & pad
    if mask is not None and mask.doc_ids is not None:
        docs = mask.doc_ids
        same = (docs[:, :, None] == docs[:, None, :])[:, None]  # (B, 1, T, T)
        allowed = same if allowed is None else allowed & same
    return allowed


def additive_mask(mask: AttnMask | None, causal: bool, Tq: int, Tk: int, dtype: torch.dtype,
                  device: torch.device) -> Tensor | None:
    """(B or 1, 1 or nh, Tq, Tk) scores offset in ``dtype``: 0 or the most negative finite
    value where a key is hidden, plus the bias; None when nothing is hidden or added."""
    key = ("additive", causal, Tq, Tk, dtype)

    def build() -> Tensor | None:
        allowed = _allowed(mask, causal, Tq, Tk, device)
        bias = None if mask is None else mask.bias
        if allowed is None:
            return None if bias is None else bias.to(dtype)
        out = torch.zeros(allowed.shape, dtype=dtype, device=device)
        out = out.masked_fill(~allowed, torch.finfo(dtype).min)
        return out if bias is None else out + bias.to(dtype)

    return build() if mask is None else mask.cached(key, build)


def _plain(mask: AttnMask | None) -> bool:
    return mask is None or (mask.key_padding is None and mask.doc_ids is None
                            and mask.bias is None)


# --- backends ---------------------------------------------------------------------------------


def eager_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float = 0.0,
                    mask: AttnMask | None = None, scale: float | None = None) -> Tensor:
    """The explicit reference: softmax(q kᵀ · scale + mask) v, the softmax taken in fp32."""
    Tq, Tk, hs = q.size(-2), k.size(-2), q.size(-1)
    k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))  # (B, nh, Tk, hs)
    scale = 1.0 / math.sqrt(hs) if scale is None else scale
    att = (q @ k.transpose(-2, -1)).float() * scale  # (B, nh, Tq, Tk)
    offset = additive_mask(mask, causal, Tq, Tk, torch.float32, q.device)
    if offset is not None:
        att = att + offset
    att = F.softmax(att, dim=-1).to(q.dtype)
    att = F.dropout(att, p=dropout_p, training=dropout_p > 0)
    return att @ v  # (B, nh, Tq, hs)


def sdpa_kernels(dtype: torch.dtype, masked: bool, cudnn: bool) -> list[SDPBackend]:
    """The CUDA kernels SDPA may use, in priority order; never the math kernel. ``masked``: an
    explicit mask is passed (FlashAttention cannot take one); ``cudnn``: cuDNN attention first
    (``attn_impl=cudnn``), where the inputs are fp16/bf16 and unmasked."""
    if masked:
        return _CUDA_MASKED_KERNELS
    if dtype not in _HALF:
        return _CUDA_FP32_KERNELS
    return _CUDA_CUDNN_KERNELS if cudnn else _CUDA_HALF_KERNELS


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float,
          mask: AttnMask | None, scale: float | None, cudnn: bool) -> Tensor:
    k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))  # (B, nh, Tk, hs)
    kwargs: dict[str, Any] = {"dropout_p": dropout_p, "scale": scale}
    causal_only = _plain(mask) and (not causal or q.size(-2) == k.size(-2))
    if causal_only:
        kwargs["is_causal"] = causal
    else:
        kwargs["attn_mask"] = additive_mask(mask, causal, q.size(-2), k.size(-2), q.dtype,
                                            q.device)
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel(sdpa_kernels(q.dtype, not causal_only, cudnn), set_priority=cudnn):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float = 0.0,
                   mask: AttnMask | None = None, scale: float | None = None) -> Tensor:
    """PyTorch SDPA; on CUDA pinned to fused kernels so it never falls to the math kernel."""
    return _sdpa(q, k, v, causal, dropout_p, mask, scale, cudnn=False)


def cudnn_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float = 0.0,
                    mask: AttnMask | None = None, scale: float | None = None) -> Tensor:
    """PyTorch SDPA with cuDNN attention first, then FlashAttention (never math); masked calls
    as :func:`sdpa_attention`. On CPU, SDPA's CPU kernel."""
    return _sdpa(q, k, v, causal, dropout_p, mask, scale, cudnn=True)


def varlen_layout(mask: AttnMask, B: int, T: int) -> tuple[Tensor, Tensor, int]:
    """(indices of kept tokens in the flattened (B·T), cu_seqlens int32, max_seqlen) for
    flash_attn's varlen API: a sequence is a run of one document within one row, padding left
    out. Syncs with the host once (max_seqlen), memoised per forward."""

    def build() -> tuple[Tensor, Tensor, int]:
        device = (mask.doc_ids if mask.doc_ids is not None else mask.key_padding).device
        seg = mask.doc_ids if mask.doc_ids is not None else torch.zeros(
            B, T, dtype=torch.long, device=device)
        keep = torch.ones(B, T, dtype=torch.bool, device=device) if mask.key_padding is None \
            else mask.key_padding.bool()
        starts = torch.ones(B, T, dtype=torch.bool, device=device)
        starts[:, 1:] = (seg[:, 1:] != seg[:, :-1]) | (keep[:, 1:] != keep[:, :-1])
        kept = keep.flatten()
        indices = kept.nonzero().squeeze(1)
        lengths = torch.diff(torch.cat([starts.flatten()[kept].nonzero().squeeze(1),
                                        torch.tensor([indices.numel()], device=device)]))
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return indices, cu, int(lengths.max())

    return mask.cached(("varlen", B, T), build)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float = 0.0,
                    mask: AttnMask | None = None, scale: float | None = None) -> Tensor:
    """The flash_attn package, which wants (B, T, nh, hs) and takes fewer kv heads as they are;
    padding and documents go through its varlen API (self-attention)."""
    fa = _flash_attn_module()
    assert not isinstance(fa, str), fa  # resolve_attn_impl checked
    if mask is not None and mask.bias is not None:
        raise ValueError("flash_attn cannot add an attention bias")
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, h, hs)
    if _plain(mask):
        out = fa.flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal)
        return out.transpose(1, 2)  # (B, nh, T, hs)
    B, T = q.shape[:2]
    if k.size(1) != T:
        if mask.bias is None and mask.doc_ids is None:  # a cached decode step over padding
            return sdpa_attention(*(t.transpose(1, 2) for t in (q, k, v)), causal, dropout_p,
                                  mask, scale)
        raise ValueError("flash_attn with a padding or document mask is self-attention only")
    indices, cu, max_len = varlen_layout(mask, B, T)
    flat = [t.flatten(0, 1).index_select(0, indices) for t in (q, k, v)]  # (n, h, hs)
    out = fa.flash_attn_varlen_func(*flat, cu, cu, max_len, max_len, dropout_p=dropout_p,
                                    softmax_scale=scale, causal=causal)
    full = out.new_zeros(B * T, *out.shape[1:]).index_copy_(0, indices, out)
    return full.view(B, T, *out.shape[1:]).transpose(1, 2)  # (B, nh, T, hs)


@functools.lru_cache(maxsize=2)
def _flex_fn(compiled: bool) -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention
    # dynamic shapes after the first recompile: generation grows T every step
    return torch.compile(flex_attention) if compiled else flex_attention


def _flex_block_mask(mask: AttnMask | None, causal: bool, B: int, Tq: int, Tk: int,
                     device: torch.device) -> Any:
    """FlexAttention's block mask for causality, padding and documents; None when none apply."""
    from torch.nn.attention.flex_attention import create_block_mask

    padding = None if mask is None else mask.key_padding
    docs = None if mask is None else mask.doc_ids
    if not causal and padding is None and docs is None:
        return None

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        keep = q_idx + (Tk - Tq) >= kv_idx if causal else q_idx >= 0
        if padding is not None:
            keep = keep & padding[b, kv_idx]
        if docs is not None:
            keep = keep & (docs[b, q_idx] == docs[b, kv_idx])
        return keep

    batch = None if padding is None and docs is None else B
    build = functools.partial(create_block_mask, mask_mod, batch, None, Tq, Tk, device=device)
    return build() if mask is None else mask.cached(("flex_block", causal, Tq, Tk), build)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float = 0.0,
                   mask: AttnMask | None = None, scale: float | None = None) -> Tensor:
    """FlexAttention: compiled on CUDA; on CPU PyTorch's unfused forward (tests only: no
    backward there). No dropout."""
    if dropout_p > 0:
        raise ValueError("attn_impl=flex has no attention dropout; set model.dropout=0 "
                         "or use attn_impl=sdpa")
    B, Tq, Tk = q.size(0), q.size(-2), k.size(-2)
    block_mask = _flex_block_mask(mask, causal, B, Tq, Tk, q.device)
    score_mod = None
    if mask is not None and mask.bias is not None:
        bias = mask.bias  # (1 or B, nh, Tq, Tk)
        per_batch = bias.size(0) > 1

        def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor,
                      kv_idx: Tensor) -> Tensor:
            return score + bias[b if per_batch else 0, h, q_idx, kv_idx]

    fn = _flex_fn(q.device.type == "cuda")
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
              enable_gqa=k.size(1) != q.size(1))


_BACKENDS: dict[str, AttentionFn] = {
    "flash_attn": flash_attention,
    "sdpa": sdpa_attention,
    "cudnn": cudnn_attention,
    "flex": flex_attention,
    "eager": eager_attention,
}


def make_attention_fn(impl: str) -> AttentionFn:
    """The attention function of a resolved backend (not ``auto``: resolve it first)."""
    if impl not in _BACKENDS:
        raise ConfigError(f"attn_impl={impl} is not a resolved attention backend; "
                          f"valid: {', '.join(_BACKENDS)} (resolve 'auto' with resolve_attn_impl)")
    return _BACKENDS[impl]


# --- KV cache ---------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated for ``max_len``
    positions so a step writes in place (no ``torch.cat`` per step and layer).

    A forward over T new tokens has each layer's attention call :meth:`update` with its new k, v
    (B, nkv, T, hs), which returns all keys and values so far (views, B, nkv, length + T, hs);
    the model then calls :meth:`advance` (T). Every row holds the same number of positions (a
    batch is left-padded), so ``length`` is a plain int and no step syncs with the device.
    ``cross`` holds an encoder–decoder's cross-attention (k, v) per layer, computed once.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len, self.length = max_len, 0
        self.layers = [LayerKV(self, i) for i in range(n_layers)]
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * n_layers

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} needed")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


@dataclass
class LayerKV:
    """One layer's view of a :class:`KVCache`, the handle its attention receives."""

    cache: KVCache
    index: int

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(self.index, k, v)

    @property
    def cross(self) -> tuple[Tensor, Tensor] | None:
        return self.cache.cross[self.index]

    @cross.setter
    def cross(self, kv: tuple[Tensor, Tensor]) -> None:
        self.cache.cross[self.index] = kv


# --- modules ----------------------------------------------------------------------------------


def _split_heads(x: Tensor, n: int, head_dim: int) -> Tensor:
    """(B, T, n·hs) -> (B, n, T, hs)."""
    B, T, _ = x.size()
    return x.view(B, T, n, head_dim).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head or grouped-query self-attention, causal or bidirectional, with a fused q/k/v
    projection.

    ``rope`` (the (cos, sin) of ``megatrain.models.common.rotary``) rotates q and k when given;
    GPT-2 and BERT pass none (their positions are learned and added to the input). ``head_dim``
    defaults to d_model / n_heads (T5 sets its own); ``scale`` to 1/√head_dim (T5 uses 1).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, attn_impl: str,
                 dropout: float = 0.0, bias: bool = True, *, causal: bool = True,
                 head_dim: int | None = None, scale: float | None = None) -> None:
        super().__init__()
        assert n_heads % n_kv_heads == 0
        self.n_heads, self.n_kv_heads, self.causal, self.scale = n_heads, n_kv_heads, causal, scale
        self.head_dim = head_dim or d_model // n_heads
        assert head_dim or d_model % n_heads == 0
        self.dropout = dropout
        self.attn_impl = attn_impl
        self.attn_fn = make_attention_fn(attn_impl)
        q_dim, kv_dim = n_heads * self.head_dim, n_kv_heads * self.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        self.qkv = nn.Linear(d_model, q_dim + 2 * kv_dim, bias=bias)  # fused q, k, v
        self.proj = nn.Linear(q_dim, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                mask: AttnMask | None = None, cache: LayerKV | None = None) -> Tensor:
        """``cache``: x holds only the new positions; their keys and values join the cached
        ones, and a causal mask is aligned to the last query (bottom-right)."""
        B, T, _ = x.size()
        q, k, v = self.qkv(x).split(self.split, dim=2)
        q = _split_heads(q, self.n_heads, self.head_dim)  # (B, nh, T, hs)
        k = _split_heads(k, self.n_kv_heads, self.head_dim)  # (B, nkv, T, hs)
        v = _split_heads(v, self.n_kv_heads, self.head_dim)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        causal = self.causal
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nkv, L + T, hs)
            causal = causal and T > 1  # one query at the end sees every key
        y = self.attn_fn(q, k, v, causal, self.dropout if self.training else 0.0,
                         mask, self.scale)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh·hs)
        return self.resid_dropout(self.proj(y))

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, causal={self.causal}, "
                f"attn_impl={self.attn_impl}")


class CrossAttention(nn.Module):
    """Attention from a decoder's states (queries) to an encoder's output (keys and values),
    with a fused k/v projection; ``mask.key_padding`` hides the encoder's padding."""

    def __init__(self, d_model: int, n_heads: int, attn_impl: str, dropout: float = 0.0,
                 bias: bool = True, *, head_dim: int | None = None,
                 scale: float | None = None) -> None:
        super().__init__()
        self.n_heads, self.scale, self.dropout = n_heads, scale, dropout
        self.head_dim = head_dim or d_model // n_heads
        self.attn_impl = attn_impl
        self.attn_fn = make_attention_fn(attn_impl)
        inner = n_heads * self.head_dim
        self.q = nn.Linear(d_model, inner, bias=bias)
        self.kv = nn.Linear(d_model, 2 * inner, bias=bias)  # fused k, v
        self.proj = nn.Linear(inner, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor, mask: AttnMask | None = None,
                cache: LayerKV | None = None) -> Tensor:
        """``cache``: the memory's keys and values are projected on the first call and reused."""
        B, T, _ = x.size()
        q = _split_heads(self.q(x), self.n_heads, self.head_dim)  # (B, nh, T, hs)
        kv = None if cache is None else cache.cross
        if kv is None:
            kv = tuple(_split_heads(t, self.n_heads, self.head_dim)
                       for t in self.kv(memory).chunk(2, dim=2))  # 2 x (B, nh, S, hs)
            if cache is not None:
                cache.cross = kv
        k, v = kv
        y = self.attn_fn(q, k, v, False, self.dropout if self.training else 0.0, mask, self.scale)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, -1)))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, attn_impl={self.attn_impl}"

