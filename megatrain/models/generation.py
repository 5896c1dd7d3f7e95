"""Autoregressive sampling (no KV cache: each step re-reads the context) for causal LMs and
encoder–decoders (T5: the prompt is encoded once, the decoder runs from its start token)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _next_token(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """(B, V) logits of the last position -> (B, 1) next tokens."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)  # greedy
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Append up to ``max_new_tokens`` tokens to ``input_ids`` (B, T); returns (B, T + n).

    ``temperature=0`` is greedy. The context is cropped to ``model.config.max_seq_len``. A row
    that produced ``eos_id`` keeps emitting it; generation stops once every row has. The model
    runs in eval mode (no dropout) and is put back in the mode it was in.

    An encoder–decoder (``model.is_encoder_decoder``, T5) takes ``input_ids`` as the encoder's
    input, with ``attention_mask`` (B, T) 1/0 for its padding, and returns only the generated
    decoder tokens (B, n), without the start token ``model.config.decoder_start_id``.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    was_training = model.training
    model.eval()
    try:
        seq2seq = getattr(model, "is_encoder_decoder", False)
        if seq2seq:
            next_logits, ids = _encoder_decoder(model, input_ids, attention_mask)
        elif attention_mask is not None:
            raise ValueError("attention_mask is for encoder-decoder models (the encoder's padding)")
        else:
            next_logits, ids = _decoder_only(model), input_ids
        ids = _sample_loop(next_logits, ids, max_new_tokens, temperature, top_k, eos_id, generator)
        return ids[:, 1:] if seq2seq else ids  # (B, n) without the start token, or (B, T + n)
    finally:
        model.train(was_training)


def _decoder_only(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """Next-token logits (B, V) of a causal LM, its context cropped to ``max_seq_len``."""
    max_seq_len = model.config.max_seq_len
    return lambda ids: model(ids[:, -max_seq_len:])[:, -1, :]


def _encoder_decoder(model: nn.Module, input_ids: Tensor,
                     attention_mask: Tensor | None) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """Encode once; the next-token logits decode the whole prefix each step (relative
    positions: no cropping), starting from (B, 1) ``decoder_start_id``."""
    memory = model.encode(input_ids, attention_mask)  # (B, S, C)
    start = torch.full((input_ids.size(0), 1), model.config.decoder_start_id,
                       dtype=torch.long, device=input_ids.device)  # (B, 1)
    return lambda ids: model.decode(ids, memory, attention_mask)[:, -1, :], start


def _sample_loop(
    next_logits: Callable[[Tensor], Tensor],
    ids: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    eos_id: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Append tokens drawn from ``next_logits(ids)`` (B, V) to ``ids`` (B, T)."""
    done = torch.zeros(ids.size(0), 1, dtype=torch.bool, device=ids.device)  # (B, 1)
    for _ in range(max_new_tokens):
        token = _next_token(next_logits(ids), temperature, top_k, generator)  # (B, 1)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done = done | (token == eos_id)
        ids = torch.cat([ids, token], dim=1)  # (B, T + 1)
        if eos_id is not None and bool(done.all()):
            break
    return ids
