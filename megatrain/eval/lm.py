"""Likelihood tasks: ``perplexity`` (decoder LMs), ``mlm`` (BERT), ``target_loss`` (T5).

Perplexity is per document, never across a document boundary. A document is scored as training
sees it: EOS (what precedes every document in a packed training row), its tokens, then EOS (its
end); every token after the first is scored once. A document longer than the context is scored
with Hugging Face's "perplexity of fixed-length models" sliding window: windows of
``max_seq_len`` tokens starting every ``stride`` tokens, each scoring only the tokens the
previous window did not, so each token is predicted from at least ``max_seq_len - stride``
tokens of context (all of them in the first window). Reported: ``loss`` (mean nats per scored
token), ``perplexity`` (its exp) and ``bits_per_byte`` (summed nats / ln 2 / the documents' UTF-8
bytes: comparable across tokenizers).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from types import SimpleNamespace

import numpy as np
import torch

from megatrain.data.stream.objectives import IGNORE, build_objective
from megatrain.data.stream.tasks import build_task_objective
from megatrain.errors import ConfigError
from megatrain.eval.inputs import TaskSample, TextDoc
from megatrain.eval.model import EvalModel
from megatrain.training.losses import eval_sums, model_inputs


def windows(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` windows over ``n`` tokens: the window reads tokens
    ``[begin, end)`` and scores tokens ``[first, end)`` (each from the tokens before it in the
    window); together they score tokens ``1..n-1`` once each (Hugging Face's recipe)."""
    if not 0 < stride < max_len:
        raise ConfigError(f"--stride {stride} must be in [1, {max_len - 1}] (below the "
                          f"context, {max_len})")
    out, begin, prev_end = [], 0, 1
    while True:
        end = min(begin + max_len, n)
        out.append((begin, end, prev_end))
        if end >= n:
            return out
        begin, prev_end = begin + stride, end


@torch.no_grad()
def perplexity(loaded: EvalModel, docs: Sequence[TextDoc], *, stride: int | None = None,
               batch_size: int = 8) -> dict[str, float]:
    """Token perplexity, mean loss and bits per byte of ``docs`` (module doc)."""
    max_len = loaded.max_seq_len
    stride = stride or max_len // 2
    eos = loaded.tokenizer.eos_id
    if eos < 0:
        raise ConfigError(f"{loaded.source}'s tokenizer has no EOS token to start documents with")
    jobs = []  # (ids of the window, index of its first scored position within it)
    for doc in docs:
        seq = np.concatenate([[eos], doc.ids, [eos]]).astype(np.int64)
        jobs += [(seq[b:e], f - b) for b, e, f in windows(len(seq), max_len, stride)]
    nats, tokens = 0.0, 0
    for batch in _batches(jobs, batch_size):
        inputs, labels = _causal_batch(batch, loaded.device)
        sums = _loss_sums(loaded, {"input_ids": inputs, "labels": labels})
        nats, tokens = nats + float(sums["loss"]), tokens + int(sums["count"])
    nbytes = sum(doc.nbytes for doc in docs)
    loss = nats / tokens
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nats / math.log(2) / nbytes, "tokens": tokens, "bytes": nbytes,
            "documents": len(docs), "windows": len(jobs), "nats": nats}


def _loss_sums(loaded: EvalModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The summed token loss and labelled count of ``batch`` (``losses.eval_sums``): the model
    takes the labels and returns the loss computed a chunk of rows at a time, never the whole
    (B, T, V) logits."""
    inputs = model_inputs(batch, loaded.device, "on", loaded.model.config.vocab_size)
    return eval_sums(loaded.model(**inputs), batch)


def _batches(jobs: list, batch_size: int) -> Iterator[list]:
    """Jobs longest first (little padding), ``batch_size`` at a time."""
    order = sorted(jobs, key=lambda job: -len(job[0]))
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def _causal_batch(batch: list[tuple[np.ndarray, int]], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs (B, T) and their next-token labels (B, T): -100 before each
    window's first scored position and on the padding (a causal model's positions never see
    the padding after them, so no mask is needed)."""
    width = max(len(ids) for ids, _ in batch)
    inputs = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for r, (ids, first) in enumerate(batch):
        inputs[r, : len(ids)] = torch.from_numpy(ids)
        labels[r, first - 1 : len(ids) - 1] = torch.from_numpy(ids[first:])
    return inputs.to(device), labels.to(device)


@torch.no_grad()
def masked_lm(loaded: EvalModel, docs: Sequence[TextDoc], *, seed: int = 0,
              batch_size: int = 8, mask_prob: float = 0.15) -> dict[str, float]:
    """BERT's masked-token loss and accuracy: each document + EOS cut into rows of
    ``max_seq_len``, masked as training masks (``mask_prob`` of the non-special tokens, 80/10/10),
    row ``i`` with its own generator seeded ``(seed, i)``, so the masks do not depend on the
    batch size."""
    tok, width = loaded.tokenizer, loaded.max_seq_len
    objective = build_objective("mlm", width, tok, mask_prob=mask_prob)
    pad = tok.pad_id if tok.pad_id >= 0 else tok.eos_id
    rows = [seq[i : i + width] for doc in docs
            for seq in [np.append(doc.ids, tok.eos_id)] for i in range(0, len(seq), width)]
    sums = {"loss": 0.0, "count": 0.0, "correct": 0.0}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        inputs = torch.full((len(chunk), max(map(len, chunk))), pad, dtype=torch.long)
        labels = torch.full_like(inputs, IGNORE)
        attention = torch.zeros_like(inputs)
        for r, row in enumerate(chunk):  # each row masked alone, at its own length
            masked = objective.mask(row[None, :], np.random.default_rng([seed, start + r]))
            inputs[r, : len(row)], labels[r, : len(row)] = masked["input_ids"][0], \
                masked["labels"][0]
            attention[r, : len(row)] = 1
        inputs, labels = inputs.to(loaded.device), labels.to(loaded.device)
        logits = loaded.model(inputs, attention_mask=attention.to(inputs.device))
        if isinstance(logits, tuple):  # with an NSP head
            logits = logits[0]
        for name, value in eval_sums(logits, {"labels": labels}).items():
            sums[name] += float(value)
        chosen = labels != IGNORE
        sums["correct"] += float((logits.argmax(-1)[chosen] == labels[chosen]).sum())
    if not sums["count"]:
        raise ConfigError("--task mlm: no token was masked (are the documents empty?)")
    loss = sums["loss"] / sums["count"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)),
            "accuracy": sums["correct"] / sums["count"], "masked_tokens": int(sums["count"]),
            "rows": len(rows), "documents": len(docs)}


@torch.no_grad()
def target_loss(loaded: EvalModel, samples: Sequence[TaskSample], *, batch_size: int = 8,
                target_len: int | None = None) -> dict[str, float]:
    """T5's loss per target token (the target and its EOS) of input → target samples, batched
    and truncated as seq2seq fine-tuning does (``target_len``: the target's cut, default the
    context)."""
    objective = build_task_objective("seq2seq", loaded.max_seq_len, loaded.tokenizer,
                                     target_len=target_len)
    picked = [objective.sample(SimpleNamespace(tokens=s.tokens, extra=s.extra)) for s in samples]
    loss, count = 0.0, 0.0
    for start in range(0, len(picked), batch_size):
        batch = objective.collate([[s] for s in picked[start : start + batch_size]])
        sums = _loss_sums(loaded, batch)
        loss, count = loss + float(sums["loss"]), count + float(sums["count"])
    mean = loss / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "target_tokens": int(count),
            "examples": len(picked)}
