"""Cross-entropy through the output projection without the whole logits.

A language model's loss used to hold ``(tokens, vocab)`` fp32 logits, their log-softmax and
their gradient at once: 4.2 GB per micro-batch of 4 × 2048 tokens with a 128k vocabulary,
often the biggest activation of all. :func:`linear_cross_entropy` computes the same summed
cross-entropy a chunk of rows at a time under one autograd Function: the forward keeps only the
hidden states, the labels and one log-sum-exp per row; the backward recomputes each chunk's
logits and accumulates the gradients of the hidden states, the weight and the bias (as Liger's
fused linear cross-entropy and torchtune's chunked loss do). Softmax, log-sum-exp and the weight
gradient accumulate in fp32; the matmuls run in the weight's dtype, or autocast's.

:class:`LMHead` is the models' output projection: called with labels it returns that summed
loss from inside its own forward, so ZeRO-3 gathers the weight there (and again for the
backward) as it does for any module; without labels it is the ``nn.Linear`` it always was.
On CUDA, Liger's fused kernel is used instead when ``liger-kernel`` is installed (optional).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

IGNORE = -100  # the labels' ignore index (megatrain.data.stream.objectives.IGNORE)


def _compute_dtype(weight: Tensor) -> torch.dtype:
    """The matmuls' dtype: autocast's where it is on for the weight's device, else the weight's."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """fp32, or the matmuls' dtype where that is wider (float64 in a gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One chunk's logits (rows, V) in fp32 (the matmul in the operands' dtype)."""
    out = hidden @ weight.t()
    if bias is not None:
        out += bias
    return out.to(_accumulation(out.dtype))


class _ChunkedLinearCE(torch.autograd.Function):
    """sum over labelled rows of cross_entropy(hidden @ weight.T + bias, labels), chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                chunk: int, dtype: torch.dtype) -> Tensor:
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        acc = _accumulation(dtype)
        lse = torch.empty(hidden.size(0), dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.size(0), chunk):
            rows = slice(start, start + chunk)
            logits = _logits(hidden[rows].to(dtype), w, b)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            target = labels[rows]
            valid = target != IGNORE
            picked = logits.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(valid, lse[rows] - picked, 0.0).sum()
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        dtype, need_h, need_w, need_b = ctx.dtype, *ctx.needs_input_grad[:3]
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = _accumulation(dtype)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.size(0), dtype=acc, device=weight.device) if need_b else None
        for start in range(0, hidden.size(0), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h = hidden[rows].to(dtype)
            target = labels[rows]
            valid = target != IGNORE
            # d(lse - logit[target]) / d logits = softmax - one_hot, on labelled rows only
            g = _logits(h, w, b).sub_(lse[rows].unsqueeze(1)).exp_()
            g.scatter_add_(1, target.clamp(min=0).unsqueeze(1),
                           torch.full_like(g[:, :1], -1.0))
            g.mul_((valid.to(acc) * grad).unsqueeze(1))
            if grad_b is not None:
                grad_b += g.sum(0)
            g = g.to(dtype)
            if grad_h is not None:
                grad_h[rows] = g @ w
            if grad_w is not None:
                if dtype == acc:
                    grad_w.addmm_(g.t(), h)
                else:  # no mixed-dtype addmm on every backend: add the chunk's part in place
                    grad_w += g.t() @ h  # (on CUDA cast inside the add, no fp32 copy)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor,
                         bias: Tensor | None = None, chunk: int = 1024) -> Tensor:
    """Σ over rows with a label (not -100) of cross_entropy(hidden @ weight.T + bias, label):
    ``hidden`` (N, C), ``weight`` (V, C), ``labels`` (N,), ``bias`` (V,); an fp32 scalar. At
    most ``chunk`` rows of logits exist at a time, in the forward and in the backward."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be at least 1")
    return _ChunkedLinearCE.apply(hidden, weight, bias, labels, chunk, _compute_dtype(weight))


@functools.cache
def _liger_loss() -> nn.Module | None:
    """Liger's fused linear cross-entropy (a Triton kernel for CUDA), summed; None when
    ``liger-kernel`` is not installed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")


class LMHead(nn.Linear):
    """The output projection: ``head(x)`` is the logits (an ``nn.Linear``, same parameters and
    state-dict keys); ``head(x, labels, loss_chunk)`` is the summed cross-entropy over the
    labelled positions, an fp32 scalar, computed ``loss_chunk`` rows at a time."""

    def forward(self, x: Tensor, labels: Tensor | None = None,  # type: ignore[override]
                loss_chunk: int = 0) -> Tensor:
        if labels is None:
            return super().forward(x)
        hidden, flat = x.reshape(-1, x.size(-1)), labels.reshape(-1)
        fused = _liger_loss() if x.is_cuda else None
        if fused is not None:
            return fused(self.weight, hidden, flat, self.bias).float()
        return linear_cross_entropy(hidden, self.weight, flat, self.bias,
                                    loss_chunk or hidden.size(0))


__all__ = ["IGNORE", "LMHead", "linear_cross_entropy"]
