"""Training objectives: a packed window of token ids -> a model's batch.

The stream packs documents (each followed by EOS) into windows of ``rows · row_tokens + overlap``
tokens; an objective turns a window into tensors:

- ``clm`` (GPT): ``input_ids`` and ``labels`` shifted by one (the window reads one token past
  its rows, ``overlap = 1``).
- ``mlm`` (BERT): 15% of the tokens are chosen; of those 80% become ``[MASK]``, 10% a random token
  and 10% stay; ``labels`` hold the originals there and -100 elsewhere (RoBERTa-style dynamic
  masking: a window is masked afresh every epoch). With whole-word masking the tokens are chosen
  word by word, as BERT's ``create_pretraining_data`` does. With ``data.nsp`` the rows are
  BERT's sentence pairs (``[CLS] A [SEP] B [SEP]``, ``token_type_ids``) with a pair label
  ``nsp_labels`` (B random or next, or A and B swapped or not): ``SentencePairs``.
- ``span`` (T5): span corruption as in the T5 paper: ~15% of the tokens in spans of mean length 3
  are replaced by one sentinel each; the targets are the sentinels followed by the spans they
  hide. Raw rows are as long as needed for the corrupted inputs to fill ``seq_len``.

Every random choice is drawn from a generator the stream seeds from the window's position in the
global order, so a batch is the same whether it is read straight through, after a resume, or on
another number of ranks. ``doc_ids`` (the document index of each input token within its row) are
added when document masking is on: the models then attend within documents only and restart
positions per document.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from megatrain.data.stream.targets import IGNORE
from megatrain.data.stream.tasks import TASK_OBJECTIVES, build_task_objective
from megatrain.data.tokenizer import WORD_ALONE, WORD_END, WORD_START
from megatrain.errors import ConfigError

OBJECTIVES = ("clm", "mlm", "span", *TASK_OBJECTIVES)
_SPECIAL = 4  # MaskedLM's word table: a special token (never chosen)


class Objective(Protocol):
    name: str
    row_tokens: int  # stream tokens one row consumes
    overlap: int  # tokens a window reads past its rows (CLM's shifted label)

    def batch(self, window: np.ndarray, rows: int, rng: np.random.Generator) -> dict[str, Any]:
        """The model inputs and ``labels`` of a window of ``rows · row_tokens + overlap`` ids."""
        ...


def doc_ids_of(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """(rows, T) document index of every token within its row: a document ends at its EOS."""
    ends = inputs == eos_id
    ids = np.cumsum(ends, axis=1)
    return ids - ends  # the EOS itself still belongs to the document it ends


@dataclass(frozen=True)
class CausalLM:
    """Next-token prediction over packed rows."""

    seq_len: int
    eos_id: int
    doc_masking: bool = False
    name: str = "clm"
    overlap: int = 1

    @property
    def row_tokens(self) -> int:
        return self.seq_len

    def batch(self, window: np.ndarray, rows: int, rng: np.random.Generator) -> dict[str, Any]:
        del rng  # deterministic
        T = self.seq_len
        inputs = np.lib.stride_tricks.sliding_window_view(window[:-1], T)[::T][:rows]
        labels = np.lib.stride_tricks.sliding_window_view(window[1:], T)[::T][:rows]
        out = {"input_ids": torch.from_numpy(inputs.copy()),
               "labels": torch.from_numpy(labels.copy())}
        if self.doc_masking:
            out["doc_ids"] = torch.from_numpy(doc_ids_of(inputs, self.eos_id))
        return out


@dataclass(frozen=True)
class MaskedLM:
    """BERT's masked-token prediction with 80/10/10 dynamic masking; specials are never chosen.

    With ``word_table`` (the tokenizer's per-id ``WORD_START`` / ``WORD_END`` flags, see
    ``Tokenizer.word_table``) it masks whole words, as Google BERT's ``create_pretraining_data``
    and Hugging Face's ``DataCollatorForWholeWordMask``: a word is a piece that starts one (a
    ``WORD_START`` piece, one after a ``WORD_END`` piece — whitespace or a special — or a row's
    first) and the pieces after it that continue it; in each row the candidate words (every word
    but the specials, which are words of their own) are shuffled and taken in that order while
    the count of chosen tokens stays within ``round(mask_prob · non-special tokens)`` — a word
    that would overflow it is skipped and the next tried, as BERT does. The 80/10/10 treatment is
    then decided per token, as both reference implementations do: the whole word is always
    predicted, but its pieces' inputs are drawn independently (a word may read ``[MASK]`` next to
    a kept piece), which keeps exactly token-level MLM's proportions of ``[MASK]``, random and
    kept inputs among the targets, and the same code for both.
    """

    seq_len: int
    eos_id: int
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    mask_prob: float = 0.15
    doc_masking: bool = False
    name: str = "mlm"
    overlap: int = 0
    word_table: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.word_table is not None:  # the specials stand alone, whatever the table says
            table = np.array(self.word_table, dtype=np.uint8)
            table[list(self.special_ids)] = WORD_ALONE | _SPECIAL
            object.__setattr__(self, "word_table", table)

    @property
    def row_tokens(self) -> int:
        return self.seq_len

    def batch(self, window: np.ndarray, rows: int, rng: np.random.Generator) -> dict[str, Any]:
        tokens = window[: rows * self.seq_len].reshape(rows, self.seq_len)
        out = self.mask(tokens, rng)
        if self.doc_masking:
            out["doc_ids"] = torch.from_numpy(doc_ids_of(tokens, self.eos_id))
        return out

    def mask(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """``input_ids`` (80/10/10 masked) and ``labels`` (the originals where chosen, -100
        elsewhere) of (rows, T) ids."""
        if self.word_table is None:
            chosen = (rng.random(tokens.shape) < self.mask_prob) & ~np.isin(tokens,
                                                                             self.special_ids)
        else:
            chosen = self.whole_words(tokens, rng)
        action = rng.random(tokens.shape)  # < 0.8: [MASK]; < 0.9: random token; else keep
        inputs = np.where(chosen & (action < 0.8), self.mask_id, tokens)
        randomize = chosen & (action >= 0.8) & (action < 0.9)
        inputs = np.where(randomize, rng.integers(0, self.vocab_size, tokens.shape), inputs)
        return {"input_ids": torch.from_numpy(inputs.astype(np.int64)),
                "labels": torch.from_numpy(np.where(chosen, tokens, IGNORE).astype(np.int64))}

    def whole_words(self, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Bool (rows, T): the tokens of the whole words chosen in each row (class docstring)."""
        rows, T = tokens.shape
        flags = self.word_table[tokens.reshape(-1)]
        starts = (flags & WORD_START) > 0
        starts[1:] |= (flags[:-1] & WORD_END) > 0
        starts[::T] = True  # words never cross rows
        first = np.flatnonzero(starts)  # each word's first token
        lengths = np.diff(first, append=tokens.size)
        row = first // T
        words = np.flatnonzero((flags[first] & _SPECIAL) == 0)  # the candidates
        # At least one token per row, as BERT and Hugging Face's whole-word collator do.
        budget = np.maximum(1, np.rint(self.mask_prob * np.bincount(row[words], lengths[words],
                                                                     rows)))
        # Shuffle each row's candidates: sort by row, then by a random key.
        words = words[np.argsort(row[words] + rng.random(len(words)), kind="stable")]
        length, row = lengths[words], row[words]
        left = budget[row]
        taken = []
        # BERT's greedy pass, vectorised: a word too long for what is left of its row's budget
        # never fits later (the budget only shrinks); the others fit as long as the running sum
        # of their lengths does. Each round takes at least one word in every row that has one
        # that fits, and the first that overflows no longer fits the next round's budget.
        while len(words):
            total = np.cumsum(length)
            before = total - length  # the lengths before each word, its row's and earlier rows'
            row_start = np.flatnonzero(np.diff(row, prepend=-1))
            before -= np.repeat(before[row_start], np.diff(row_start, append=len(row)))
            fits = before + length <= left
            taken.append(words[fits])
            left = left - np.bincount(row[fits], length[fits], rows)[row]
            alive = ~fits & (length <= left)
            words, length, row, left = words[alive], length[alive], row[alive], left[alive]
        chosen = np.zeros(len(first), dtype=bool)
        if taken:  # no candidate at all: a batch of specials only, or none
            chosen[np.concatenate(taken)] = True
        return chosen[np.cumsum(starts) - 1].reshape(rows, T)


NSP_MODES = ("next", "order")


@dataclass(frozen=True)
class SentencePairs:
    """BERT's pretraining rows: masked LM on sentence pairs plus the pair's label (``data.nsp``).

    Each row consumes ``n = seq_len - 3`` tokens of the packed stream (documents followed by EOS,
    as for ``mlm``) and becomes ``[CLS] A [SEP] B [SEP]``, exactly ``seq_len`` long, with
    ``token_type_ids`` 0 on ``[CLS] A [SEP]`` and 1 on ``B [SEP]``. A is the row's first ``a``
    tokens, ``a`` uniform in 1..n-1; B has the other ``n - a`` places.

    - ``next`` (BERT's next-sentence prediction): in half the rows (``nsp_labels`` 0) B is the
      rest of the row, the text that follows A; in the others (1) B is ``n - a`` consecutive
      tokens of the same window (any row's) none of which belongs to a document that A touches
      (``doc_ids_of`` over the window), its start uniform among all such spans. A window with no
      such span (its documents are longer than it) gives a span of the other rows instead: text
      of A's own document, but neither A nor what follows it.
    - ``order`` (ALBERT's sentence-order prediction, Megatron's BERT): A and B are the row's two
      consecutive parts, swapped in half the rows (1): ``[CLS] B [SEP] A [SEP]``.

    Then 80/10/10 masking (``MaskedLM.mask``) over the whole row; ``[CLS]``, ``[SEP]`` and the
    other specials are never chosen. Every draw (labels, split points, random-B starts, then the
    masking) is a fixed number per row from the window's generator, so a batch is the same
    straight through, after a resume and on any number of ranks.

    Where this departs from Google's ``create_pretraining_data``, and why: the stream has no
    sentence boundaries, so A and B are token spans split at a random token, not runs of whole
    sentences; rows always fill ``seq_len`` (no ``short_seq_prob`` shorter rows, no padding). A
    "next" B may run past an EOS into the next document, as ``mlm`` rows do (BERT keeps it in A's
    document). A random B comes from another document of the same micro-batch window rather than
    of the whole corpus (what makes it deterministic without an index of documents). Where the
    window is one document (documents longer than ``rows · n`` tokens, e.g. books or files
    chunked at 64K characters, with few rows per micro-batch), "random" can only mean a distant
    span of that document: label 1 then says that B does not follow A, a coherence task between
    BERT's and sentence order; more rows per micro-batch, or shorter documents, give BERT's rule
    more often. Only a window of one row in one document keeps every row a "next" pair. BERT puts
    the text a random B displaced back into its document; a stream cannot, so that part of the
    row (a quarter of the tokens on average) is skipped. ``data.doc_masking`` does not apply: a
    pair is one sequence.
    """

    mlm: MaskedLM
    cls_id: int
    sep_id: int
    mode: str = "next"
    overlap: int = 0

    @property
    def name(self) -> str:
        return "mlm+nsp" if self.mode == "next" else "mlm+sop"

    @property
    def row_tokens(self) -> int:
        return self.mlm.seq_len - 3

    def batch(self, window: np.ndarray, rows: int, rng: np.random.Generator) -> dict[str, Any]:
        n = self.row_tokens
        flat = window[: rows * n]
        second = rng.random(rows) < 0.5  # label 1: B random (next) or swapped (order)
        a = rng.integers(1, n, rows)  # A's length; B takes the other n - a places
        where = rng.random(rows)  # where a random B starts among the allowed spans
        j = np.arange(n)
        src = np.arange(rows)[:, None] * n + j  # (rows, n): the window position of each token
        if self.mode == "order":
            src = np.where(second[:, None], src - j + (j + a[:, None]) % n, src)
            first = np.where(second, n - a, a)
        else:
            start, found = self.random_b_starts(flat, a, where)
            second &= found
            moved = second[:, None] & (j >= a[:, None])
            src = np.where(moved, start[:, None] + j - a[:, None], src)
            first = a
        tokens, types = self.pairs(flat[src], first)
        out = self.mlm.mask(tokens, rng)
        out["token_type_ids"] = torch.from_numpy(types)
        out["nsp_labels"] = torch.from_numpy(second.astype(np.int64))
        return out

    def random_b_starts(self, flat: np.ndarray, a: np.ndarray, where: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
        """(start in ``flat`` of each row's random B, whether the window has one): a span of
        ``n - a`` tokens wholly before the first or after the last document A touches, else
        (none) wholly in the other rows."""
        n, W = self.row_tokens, len(flat)
        doc = doc_ids_of(flat[None], self.mlm.eos_id)[0]  # (W,), non-decreasing
        row_start = np.arange(len(a)) * n
        first_a = np.searchsorted(doc, doc[row_start], "left")  # A's first document begins
        after_a = np.searchsorted(doc, doc[row_start + a - 1], "right")  # A's last one ends
        other_docs = _spans_outside(first_a, after_a, n - a, W, where)
        other_rows = _spans_outside(row_start, row_start + n, n - a, W, where)
        use_docs = other_docs[1]
        return (np.where(use_docs, other_docs[0], other_rows[0]), use_docs | other_rows[1])

    def pairs(self, content: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(``[CLS] P [SEP] Q [SEP]`` ids, segment ids) of rows of content whose first part P is
        ``first`` tokens long."""
        rows, n = content.shape
        j = np.arange(n + 3)[None]
        f = first[:, None]
        at = np.clip(np.where(j <= f, j - 1, j - 2), 0, n - 1)  # content index (specials: any)
        tokens = np.take_along_axis(content, np.broadcast_to(at, (rows, n + 3)), 1)
        tokens = np.where((j == f + 1) | (j == n + 2), self.sep_id, tokens)
        tokens = np.where(j == 0, self.cls_id, tokens).astype(np.int64)
        return tokens, np.broadcast_to(j > f + 1, tokens.shape).astype(np.int64)


def _spans_outside(lo: np.ndarray, hi: np.ndarray, length: np.ndarray, size: int,
                   where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, whether there is one) per row: the span of ``length`` in ``[0, size)`` that misses
    ``[lo, hi)``, the ``where`` (in [0, 1)) fraction of the way through all such starts."""
    before = np.maximum(lo - length + 1, 0)  # starts 0..lo - length
    after = np.maximum(size - length - hi + 1, 0)  # starts hi..size - length
    k = (where * (before + after)).astype(np.int64)
    return np.where(k < before, k, hi + k - before), before + after > 0


def span_lengths(raw_len: int, noise_density: float, mean_span: float) -> tuple[int, int, int]:
    """(noise tokens, spans, encoder input length incl. EOS) of a raw row, as T5 computes them."""
    noise = min(max(round(raw_len * noise_density), 1), raw_len - 1)
    spans = max(round(noise / mean_span), 1)
    return noise, spans, raw_len - noise + spans + 1


def raw_length_for(seq_len: int, noise_density: float, mean_span: float) -> int:
    """The longest raw row whose corrupted input (sentinels and EOS included) fits ``seq_len``
    (T5's ``compute_input_and_target_lengths``)."""
    raw = seq_len
    while span_lengths(raw + 1, noise_density, mean_span)[2] <= seq_len:
        raw += 1
    return raw


def _segment_lengths(items: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``items`` into ``segments`` non-empty runs at random: their lengths."""
    cuts = np.arange(items - 1) < segments - 1
    rng.shuffle(cuts)
    starts = np.concatenate([[True], cuts])
    return np.bincount(np.cumsum(starts) - 1)


def random_spans_noise_mask(length: int, noise: int, spans: int,
                            rng: np.random.Generator) -> np.ndarray:
    """Bool (length,): which tokens are noise, in ``spans`` runs that alternate with kept runs
    (the first run is kept), as in T5's ``random_spans_noise_mask``."""
    noise_runs = _segment_lengths(noise, spans, rng)
    kept_runs = _segment_lengths(length - noise, spans, rng)
    runs = np.stack([kept_runs, noise_runs], axis=1).reshape(-1)  # kept, noise, kept, ...
    return np.repeat(np.tile([False, True], spans), runs)


@dataclass(frozen=True)
class SpanCorruption:
    """T5's span corruption over packed rows; every row yields inputs and targets of fixed
    lengths, so batches need no padding."""

    seq_len: int
    eos_id: int
    start_id: int  # the decoder's start token (T5 uses pad)
    sentinel_ids: tuple[int, ...]
    noise_density: float = 0.15
    mean_span: float = 3.0
    name: str = "span"
    overlap: int = 0

    def __post_init__(self) -> None:
        spans = span_lengths(self.row_tokens, self.noise_density, self.mean_span)[1]
        if spans > len(self.sentinel_ids):
            raise ConfigError(f"data.seq_len={self.seq_len} needs {spans} sentinels per row; the "
                              f"tokenizer has {len(self.sentinel_ids)}")

    @functools.cached_property
    def row_tokens(self) -> int:
        """Raw tokens per row (a search, so computed once: every batch asks)."""
        return raw_length_for(self.seq_len, self.noise_density, self.mean_span)

    @property
    def target_len(self) -> int:
        noise, spans, _ = span_lengths(self.row_tokens, self.noise_density, self.mean_span)
        return noise + spans + 1

    def batch(self, window: np.ndarray, rows: int, rng: np.random.Generator) -> dict[str, Any]:
        L = self.row_tokens
        noise, spans, _ = span_lengths(L, self.noise_density, self.mean_span)
        pairs = [self._corrupt(row, random_spans_noise_mask(L, noise, spans, rng))
                 for row in window[: rows * L].reshape(rows, L)]
        inputs, targets = (np.stack(p).astype(np.int64) for p in zip(*pairs, strict=True))
        decoder_inputs = np.concatenate([np.full((rows, 1), self.start_id), targets[:, :-1]], 1)
        return {"input_ids": torch.from_numpy(inputs),
                "decoder_input_ids": torch.from_numpy(decoder_inputs),
                "labels": torch.from_numpy(targets)}

    def _corrupt(self, row: np.ndarray, is_noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of one row, as T5's ``noise_span_to_unique_sentinel``: in the inputs
        noise span k becomes sentinel k; in the targets kept run k becomes sentinel k, so they
        read sentinel 0, hidden span 0, sentinel 1, hidden span 1, ... Both end with EOS."""
        run_start = np.concatenate([[True], is_noise[1:] != is_noise[:-1]])
        sentinels = np.asarray(self.sentinel_ids)
        noise_start, kept_start = run_start & is_noise, run_start & ~is_noise
        inputs = np.where(noise_start, sentinels[np.cumsum(noise_start) - 1], row)
        targets = np.where(kept_start, sentinels[np.cumsum(kept_start) - 1], row)
        return (np.append(inputs[~is_noise | noise_start], self.eos_id),
                np.append(targets[is_noise | kept_start], self.eos_id))


def build_objective(name: str, seq_len: int, tokenizer: Any, *, doc_masking: bool = False,
                    mask_prob: float = 0.15, noise_density: float = 0.15,
                    mean_span: float = 3.0, whole_word_masking: bool = False,
                    target_len: int | None = None, sft_loss_on: str = "completion",
                    sft_packing: bool = True, num_labels: int | None = None,
                    nsp: str | None = None) -> Objective:
    """The objective ``name`` over ``tokenizer``'s ids; ConfigError when the tokenizer lacks a
    token the objective needs (an older or foreign tokenizer without ``[MASK]`` or sentinels),
    or for whole-word masking outside ``mlm``. ``nsp`` (next | order): ``mlm`` on sentence
    pairs (``SentencePairs``)."""
    if whole_word_masking and name != "mlm":
        raise ConfigError(f"data.whole_word_masking applies to data.objective=mlm, not {name}")
    if nsp is not None:
        return sentence_pairs(nsp, name, seq_len, tokenizer, doc_masking=doc_masking,
                              mask_prob=mask_prob, whole_word_masking=whole_word_masking)
    if name == "clm":
        return CausalLM(seq_len, tokenizer.eos_id, doc_masking)
    if name == "mlm":
        if tokenizer.mask_id < 0:
            raise ConfigError(f"data.objective=mlm needs a [MASK] token; {tokenizer.path} has "
                              "none (prepare the corpus again with this version of megatrain)")
        specials = tuple(i for i in (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id,
                                     tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id,
                                     tokenizer.mask_id) if i >= 0)
        table = None
        if whole_word_masking:
            if not hasattr(tokenizer, "word_table"):
                raise ConfigError(f"data.whole_word_masking: {tokenizer.path} cannot tell words "
                                  "apart (it has no word table)")
            table = tokenizer.word_table()
            ordinary = np.setdiff1d(np.arange(len(table)), specials)
            if not (table[ordinary] & WORD_START).any():
                raise ConfigError(f"data.whole_word_masking: no piece of {tokenizer.path} starts "
                                  "a word, so every row would be one word; use token-level "
                                  "masking with this tokenizer")
        return MaskedLM(seq_len, tokenizer.eos_id, tokenizer.mask_id, tokenizer.vocab_size,
                        specials, mask_prob, doc_masking, word_table=table)
    if name == "span":
        if not tokenizer.sentinel_ids:
            raise ConfigError(f"data.objective=span needs T5 sentinels (<extra_id_N>); "
                              f"{tokenizer.path} has none")
        if doc_masking:
            raise ConfigError("data.doc_masking is not supported with data.objective=span")
        return SpanCorruption(seq_len, tokenizer.eos_id, tokenizer.pad_id,
                              tuple(tokenizer.sentinel_ids), noise_density, mean_span)
    if name in TASK_OBJECTIVES:
        return task_objective(name, seq_len, tokenizer, doc_masking=doc_masking,
                              target_len=target_len, sft_loss_on=sft_loss_on,
                              sft_packing=sft_packing, num_labels=num_labels)
    raise ConfigError(f"data.objective={name} is not an objective; valid: {', '.join(OBJECTIVES)}")


def sentence_pairs(mode: str, name: str, seq_len: int, tokenizer: Any, *, doc_masking: bool,
                   mask_prob: float, whole_word_masking: bool) -> SentencePairs:
    """``data.nsp=mode`` over ``data.objective=name``'s masked LM; ConfigError for another
    objective, document masking, a tokenizer without [CLS] / [SEP], rows too short for a pair."""
    if mode not in NSP_MODES:
        raise ConfigError(f"data.nsp={mode} is not a sentence-pair task; valid: "
                          f"{', '.join(NSP_MODES)} (or null: off)")
    if name != "mlm":
        raise ConfigError(f"data.nsp applies to data.objective=mlm, not {name}")
    if doc_masking:
        raise ConfigError("data.doc_masking does not apply with data.nsp: a sentence pair is "
                          "one sequence (its B may come from another document)")
    if tokenizer.cls_id < 0 or tokenizer.sep_id < 0:
        raise ConfigError(f"data.nsp needs [CLS] and [SEP] tokens; {tokenizer.path} lacks them")
    if seq_len < 5:
        raise ConfigError(f"data.seq_len={seq_len} is too short for [CLS] A [SEP] B [SEP]")
    mlm = build_objective(name, seq_len, tokenizer, mask_prob=mask_prob,
                          whole_word_masking=whole_word_masking)
    return SentencePairs(mlm, tokenizer.cls_id, tokenizer.sep_id, mode)


def padded_batch(objective: Objective, rows: np.ndarray, real: np.ndarray,
                 rng: np.random.Generator) -> dict[str, Any]:
    """The batch of rows packed with whole documents (``data.pack_whole_docs``): (B, C) ids
    padded at the end of each row, ``real`` False on padding, where labels become -100. A causal
    row holds its own shifted label (C = T + 1); a masked-LM row is the T inputs."""
    if isinstance(objective, CausalLM):
        inputs, labels = np.ascontiguousarray(rows[:, :-1]), rows[:, 1:].copy()
        labels[~real[:, 1:]] = IGNORE
        out = {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}
        if objective.doc_masking:
            out["doc_ids"] = torch.from_numpy(doc_ids_of(inputs, objective.eos_id))
        return out
    if isinstance(objective, MaskedLM):
        out = objective.batch(rows.reshape(-1), rows.shape[0], rng)
        out["labels"][torch.from_numpy(~real)] = IGNORE
        return out
    raise ConfigError(f"data.pack_whole_docs supports clm and mlm, not {objective.name}")


# --- task objectives (fine-tuning: megatrain.data.stream.tasks) -----------------------------

def task_objective(name: str, seq_len: int, tokenizer: Any, *, doc_masking: bool,
                   target_len: int | None, sft_loss_on: str, sft_packing: bool,
                   num_labels: int | None) -> Objective:
    """A task objective from the data config's bits: ``data.target_len`` (seq2seq),
    ``data.sft.loss_on`` / ``data.sft.packing`` (sft) and the manifest's label count (cls)."""
    if doc_masking:
        raise ConfigError(f"data.doc_masking applies to clm and mlm, not {name} (packed sft rows "
                          "always attend within each sample)")
    return build_task_objective(name, seq_len, tokenizer, target_len=target_len,
                                loss_on=sft_loss_on, packing=sft_packing, num_labels=num_labels)
