"""Autoregressive generation for causal LMs (GPT-2, Llama) and encoder–decoders (T5).

A KV cache (``model.new_cache``) makes each step run only the new token; without one (or past
``max_seq_len``, where the context slides and positions shift) each step re-runs the context
window. Decoder prompts of different lengths are left-padded, with an attention mask and
positions that start after the padding, so each row generates what it would alone. Sampling
follows Hugging Face's logits processors (repetition penalty, then temperature, top-k, top-p),
so the same logits keep the same tokens.

Three levels: :func:`generate` (a tensor batch), :func:`generate_ids` (token lists, batched and
padded here) and :func:`generate_text` (strings, with stop strings), which ``megatrain-generate``,
``megatrain-eval`` and the trainer's end-of-run sample use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from megatrain.data.tokenizer import Tokenizer

StopFn = Callable[[Tensor], Tensor]  # generated ids (B, n) -> (B,) bool: the row is finished


# --- sampling ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked from a step's logits; ``temperature=0`` is greedy."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")


def repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Hugging Face's RepetitionPenaltyLogitsProcessor: a token already in the sequence (``seen``
    (B, V) bool) has a positive logit divided by ``penalty``, a negative one multiplied by it."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Hide every logit below the k-th largest of its row (Hugging Face's TopKLogitsWarper)."""
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (nucleus
    sampling), computed as Hugging Face's TopPLogitsWarper does (ascending sort, remove while
    the cumulative probability is <= 1 - p, always keep the top token), so ties and boundaries
    fall the same way."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def next_token(logits: Tensor, sampling: Sampling, seen: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """(B, V) logits of the last position -> (B,) next tokens."""
    logits = logits.float()
    if seen is not None and sampling.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.temperature == 0.0:
        return logits.argmax(dim=-1)  # greedy
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        logits = top_k_filter(logits, sampling.top_k)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        logits = top_p_filter(logits, sampling.top_p)
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)  # (B,)


# --- what a step runs -------------------------------------------------------------------------


def _call(model: nn.Module, ids: Tensor, **kwargs: Any) -> Tensor:
    """The last position's logits (B, V) of ``model(ids, ...)``, passing only the arguments
    that are set (a plain causal LM takes ``model(ids)``); a megatrain decoder computes the
    head for that position alone."""
    if hasattr(model, "new_cache"):
        kwargs["last_only"] = True
    return model(ids, **{k: v for k, v in kwargs.items() if v is not None})[:, -1]


def _positions(mask: Tensor) -> Tensor:
    """(B, T) position ids that start after left padding (0 at the first real token), as
    Hugging Face derives them from the attention mask; padding gets 0 (it is masked out)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class _CausalLM:
    """A decoder-only model's steps: ``first()`` runs the prompt, ``append(token)`` one token.
    The context is the last ``max_seq_len`` tokens; once the cache is full the context slides,
    so every later step re-runs the window (as uncached decoding does)."""

    def __init__(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                 max_new_tokens: int, use_cache: bool) -> None:
        B, T = input_ids.shape
        self.model, self.window = model, model.config.max_seq_len
        self.ids = input_ids.new_zeros(B, T + max_new_tokens)  # preallocated: no cat per step
        self.ids[:, :T] = input_ids
        self.mask = None
        if attention_mask is not None:
            self.mask = torch.ones_like(self.ids, dtype=torch.bool)
            self.mask[:, :T] = attention_mask.bool()
        self.length = T
        self.start = max(0, T - self.window)  # the window's first column while cached
        self.cache = None
        if use_cache and hasattr(model, "new_cache"):
            self.cache = model.new_cache(B, min(T + max_new_tokens - self.start, self.window))

    def prompt(self) -> tuple[Tensor, Tensor | None]:
        """(B, T) prompt tokens and their padding mask (for the repetition penalty)."""
        T = self.length
        return self.ids[:, :T], None if self.mask is None else self.mask[:, :T]

    def first(self) -> Tensor:
        if self.cache is None:
            return self._window()
        ids = self.ids[:, self.start:self.length]
        mask = None if self.mask is None else self.mask[:, self.start:self.length]
        return _call(self.model, ids, attention_mask=mask,
                     positions=None if mask is None else _positions(mask),
                     cache=self.cache)

    def append(self, token: Tensor) -> Tensor:
        """Add (B,) tokens; the next step's logits (B, V)."""
        self.ids[:, self.length] = token
        self.length += 1
        if self.cache is not None and self.cache.length >= self.cache.max_len:
            self.cache = None  # the window slides from here: positions shift every step
        if self.cache is None:
            return self._window()
        mask = None if self.mask is None else self.mask[:, self.start:self.length]
        positions = None if mask is None else _positions(mask)[:, -1:]
        return _call(self.model, self.ids[:, self.length - 1:self.length], attention_mask=mask,
                     positions=positions, cache=self.cache)

    def _window(self) -> Tensor:
        """Re-run the last ``max_seq_len`` tokens (no cache)."""
        lo = max(0, self.length - self.window)
        mask = None if self.mask is None else self.mask[:, lo:self.length]
        return _call(self.model, self.ids[:, lo:self.length], attention_mask=mask,
                     positions=None if mask is None else _positions(mask))


class _EncoderDecoder:
    """An encoder–decoder's steps: the input is encoded once, the decoder starts from
    ``decoder_start_id``; cached, each step runs one token (cross-attention keys projected once),
    uncached it re-runs the whole decoder prefix (relative positions: no window)."""

    def __init__(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                 max_new_tokens: int, use_cache: bool) -> None:
        B = input_ids.size(0)
        self.model, self.attention_mask = model, attention_mask
        self.memory = model.encode(input_ids, attention_mask)  # (B, S, C)
        self.ids = input_ids.new_full((B, 1 + max_new_tokens), model.config.decoder_start_id)
        self.length = 1
        self.cache = model.new_cache(B, 1 + max_new_tokens) if use_cache else None

    def prompt(self) -> tuple[Tensor, None]:
        """The decoder's prefix (its start token), which Hugging Face's repetition penalty
        counts as seen."""
        return self.ids[:, :1], None

    def first(self) -> Tensor:
        return self._decode(self.ids[:, :1])

    def append(self, token: Tensor) -> Tensor:
        self.ids[:, self.length] = token
        self.length += 1
        if self.cache is None:
            return self._decode(self.ids[:, :self.length])
        return self._decode(self.ids[:, self.length - 1:self.length])

    def _decode(self, ids: Tensor) -> Tensor:
        return self.model.decode(ids, self.memory, self.attention_mask, cache=self.cache)[:, -1]


def _seen(ids: Tensor, mask: Tensor | None, vocab: int) -> Tensor:
    """(B, V) bool: which tokens occur in each row (padding left out)."""
    weights = torch.ones_like(ids, dtype=torch.float32) if mask is None else mask.float()
    counts = torch.zeros(ids.size(0), vocab, device=ids.device).scatter_add_(1, ids, weights)
    return counts > 0


# --- generate ---------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: Tensor | None = None,
    use_cache: bool = True,
    stop_fn: StopFn | None = None,
    pad_id: int | None = None,
    stop_early: bool = True,
) -> Tensor:
    """Append up to ``max_new_tokens`` tokens to ``input_ids`` (B, T); returns (B, T + n).

    ``temperature=0`` is greedy; ``top_k``, ``top_p`` and ``repetition_penalty`` act as Hugging
    Face's processors do. A decoder's ``attention_mask`` (B, T) marks left padding (0): each row
    then generates what it would alone. The context is cropped to ``model.config.max_seq_len``.

    A row is finished once it produced ``eos_id`` or ``stop_fn`` (generated ids (B, n) -> (B,)
    bool, checked at the same points as EOS) says so; it then emits ``pad_id`` (default
    ``eos_id``). Generation stops once every row has finished, and the output ends at the step
    where the last one did. The device is checked for finished rows every step on CPU and every
    8 steps elsewhere (each check syncs). ``stop_early=False`` runs all ``max_new_tokens`` steps
    whatever the rows drew (finished rows still emit ``pad_id``): the number of forward calls
    follows from the arguments alone, as ranks of a ZeRO-3 model need. The model runs in eval mode (no dropout)
    and is put back in the mode it was in.

    An encoder–decoder (``model.is_encoder_decoder``, T5) takes ``input_ids`` as the encoder's
    input, with ``attention_mask`` (B, T) 1/0 for its padding, and returns only the generated
    decoder tokens (B, n), without the start token ``model.config.decoder_start_id``.
    """
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
    fill = eos_id if pad_id is None else pad_id
    if stop_fn is not None and fill is None:
        raise ValueError("stop_fn needs eos_id or pad_id: the token a finished row emits")
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # nothing padded: the plain (fastest) attention path
    was_training = model.training
    model.eval()
    try:
        seq2seq = getattr(model, "is_encoder_decoder", False)
        state_cls = _EncoderDecoder if seq2seq else _CausalLM
        state = state_cls(model, input_ids, attention_mask, max_new_tokens, use_cache)
        new = _sample_loop(state, max_new_tokens, sampling, eos_id, fill, stop_fn, generator,
                           stop_early)
        return new if seq2seq else torch.cat([input_ids, new], dim=1)
    finally:
        model.train(was_training)


def _sample_loop(state: _CausalLM | _EncoderDecoder, max_new_tokens: int, sampling: Sampling,
                 eos_id: int | None, fill: int | None, stop_fn: StopFn | None,
                 generator: torch.Generator | None, stop_early: bool) -> Tensor:
    """The generated tokens (B, n): n is ``max_new_tokens`` or, with ``stop_early``, the step at
    which every row had finished."""
    prompt, prompt_mask = state.prompt()
    B, device = prompt.size(0), prompt.device
    out = prompt.new_zeros(B, max_new_tokens)
    finishes = eos_id is not None or stop_fn is not None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    done_at = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    check_every = 1 if device.type == "cpu" else 8
    seen = None
    if max_new_tokens > 0:
        logits = state.first()
        if sampling.repetition_penalty != 1.0:
            seen = _seen(prompt, prompt_mask, logits.size(-1))
    n = 0
    for step in range(max_new_tokens):
        token = next_token(logits, sampling, seen, generator)  # (B,)
        if fill is not None:
            token = token.masked_fill(done, fill)
        out[:, step], n = token, step + 1
        if seen is not None:
            seen[torch.arange(B, device=device), token] = True
        if eos_id is not None:
            done = done | (token == eos_id)
        check = finishes and (n % check_every == 0 or n == max_new_tokens)
        if check and stop_fn is not None:
            done = done | stop_fn(out[:, :n]).to(device)
        if finishes:
            done_at = torch.where(done & (done_at > step), step, done_at)
        if check and stop_early and bool(done.all()):
            break
        if n < max_new_tokens:
            logits = state.append(token)
    if finishes and stop_early and bool(done.all()):
        n = min(n, int(done_at.max()) + 1)
    return out[:, :n]


# --- lists of prompts ---------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad(rows: list[list[int]], left: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """(B, T) ids padded with 0 on the left or right, and their 1/0 mask."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def _cut_at(row: list[int], eos_id: int | None) -> list[int]:
    return row[:row.index(eos_id)] if eos_id is not None and eos_id in row else row


def _rows_stop(stop_fn: Callable[[list[int]], bool], eos_id: int | None) -> StopFn:
    """A per-row check of generated ids (up to EOS) as a batch's :data:`StopFn`."""
    return lambda ids: torch.tensor([stop_fn(_cut_at(row, eos_id)) for row in ids.tolist()])


def generate_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    batch_size: int = 16,
    eos_id: int | None = None,
    stop_fn: Callable[[list[int]], bool] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stop_early: bool = True,
) -> list[list[int]]:
    """The ids each prompt generates (EOS and what follows left out), in the prompts' order.

    Prompts run ``batch_size`` at a time, sorted by length so a batch holds similar lengths
    (less padding); decoders' prompts are left-padded, an encoder–decoder's inputs
    right-padded, both with a mask. ``stop_fn(ids)`` says a row's generated ids are finished
    (stop strings); it needs ``eos_id``, which a finished row emits and is cut at.
    ``stop_early``: see :func:`generate`."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if stop_fn is not None and eos_id is None:
        raise ValueError("stop_fn needs eos_id: a finished row emits it and is cut there")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt has no tokens (a decoder needs at least one: e.g. EOS)")
    device = _device(model)
    left = not getattr(model, "is_encoder_decoder", False)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    stop = None if stop_fn is None else _rows_stop(stop_fn, eos_id)
    for lo in range(0, len(order), batch_size):
        batch = order[lo:lo + batch_size]
        ids, mask = _pad([list(prompts[i]) for i in batch], left, device)
        out = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, repetition_penalty=repetition_penalty, eos_id=eos_id,
                       generator=generator, attention_mask=mask, use_cache=use_cache,
                       stop_fn=stop, stop_early=stop_early)
        new = out if not left else out[:, ids.size(1):]
        for i, row in zip(batch, new.tolist(), strict=True):
            results[i] = _cut_at(row, eos_id)
    return results


def default_encode(model: nn.Module, tokenizer: Tokenizer) -> Callable[[str], list[int]]:
    """How a plain prompt becomes ids: a decoder continues its tokens (EOS for an empty prompt,
    as a document boundary); an encoder–decoder reads them followed by EOS, as seq2seq
    fine-tuning feeds its encoder."""
    if getattr(model, "is_encoder_decoder", False):
        return lambda text: tokenizer.encode(text) + [tokenizer.eos_id]
    return lambda text: tokenizer.encode(text) or [tokenizer.eos_id]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def generate_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] = (),
    seed: int = 0,
    use_cache: bool = True,
    encode: Callable[[str], list[int]] | None = None,
    stop_early: bool = True,
) -> list[str]:
    """What the model writes after each prompt (the prompt not included), in order: decoded
    without EOS and cut before the first stop string. Greedy by default (evaluation); ``seed``
    fixes sampling. ``encode`` turns a prompt into ids (default :func:`default_encode`; pass one
    for a chat or SFT template). ``stop_early=False``: every batch runs all ``max_new_tokens``
    steps (see :func:`generate`); the text is the same."""
    encode = encode or default_encode(model, tokenizer)
    stops = [s for s in stop if s]
    stop_fn = None if not stops else (
        lambda ids: any(s in tokenizer.decode(ids) for s in stops))
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=_device(model)).manual_seed(seed)
    ids = generate_ids(model, [encode(p) for p in prompts], max_new_tokens,
                       batch_size=batch_size, eos_id=tokenizer.eos_id, stop_fn=stop_fn,
                       temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, generator=generator,
                       use_cache=use_cache, stop_early=stop_early)
    return [cut_at_stop(tokenizer.decode(row), stops) for row in ids]
