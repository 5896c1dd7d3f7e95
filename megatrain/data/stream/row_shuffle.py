"""Rows of a micro-batch from far-apart places (``data.shuffle_rows``).

The packers cut a micro-batch's B rows from one contiguous stretch of a reader's token stream,
so its rows are correlated (one document or a few neighbours) and its gradient is noisier than
B rows drawn from far-apart places, as nanoGPT samples them (docs/benchmarks.md, "nanoGPT").
``RowShuffler`` reads ``block`` windows of the inner packer at a time, permutes all their rows
with a generator seeded by (data seed, the block's first window's start in the global order)
and re-cuts them into windows of the inner windows' row counts, in order. Emitted window j
keeps inner window j's bookkeeping (start, consumed documents, tokens per source, dropped), so
each document key still appears once per epoch and the objective's draws stay seeded by
position. A finite stream's last, partial block is shuffled as it is.

Representation: a flat window (``Packer``) whose rows share no tokens (``overlap`` 0) stays flat
(its rows concatenated); with an overlap (causal LM's shifted label) each row keeps its own
``row_tokens + overlap`` tokens as a padded-rows window with every position real, which
``objectives.padded_batch`` turns into the same tensors the flat window gives. ``RowPacker``'s
windows are rows already; their ``real`` masks move with them.

State: the inner packer's state from before the current block, plus ``skip`` (windows of the
block already emitted), ``block`` and a digest of the block's rows. On the same layout a resume
restores the block's start, rebuilds the block (deterministic) and skips those windows: exactly
the batches of an uninterrupted run. The elastic re-split (another world size or worker count)
keeps positions only, so the block is read again from its start: each old reader repeats at
most ``block - 1`` micro-batches' rows (never loses any); ``train_stream`` logs a warning when
that happens. A rebuilt block whose digest differs (a finite stream's last, partial block
resumed with more epochs: its data now runs on) is read again from its start too, with a
warning from here: skipping into it would lose rows.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np

from megatrain.data.stream.packing import Packer, RowPacker, Window

log = logging.getLogger("megatrain")
SKIP, BLOCK, DIGEST = "skip", "block", "block_digest"
_STREAM_TAG = 1  # keeps the permutation's stream apart from the objective's draws of window 0


class RowShuffler:
    """``block`` windows of ``inner`` at a time, their rows permuted among them (module doc)."""

    def __init__(self, inner: Packer | RowPacker, *, block: int, seed: int,
                 skip: int = 0, digest: str | None = None) -> None:
        if block < 2:
            raise ValueError(f"a row shuffle block needs at least 2 windows, got {block}")
        self.inner, self.block, self.seed = inner, block, seed
        self.producer = inner.producer  # the stream reads the producer's skip events
        self._row_tokens = inner.row_tokens if isinstance(inner, Packer) else 0  # flat stride
        self._skip = skip  # windows of the first block already emitted before a resume
        self._saved_digest = digest  # that block's digest, to check the rebuilt one against
        self._block_start: dict[str, Any] = {}
        self._digest = ""
        self._emitted = 0
        self._size = 0

    def windows(self) -> Iterator[Window]:
        source = self.inner.windows()
        while True:
            self._block_start = self.inner.state()
            block = list(islice(source, self.block))
            if not block:
                return
            self._size, self._emitted, self._digest = len(block), 0, block_digest(block)
            if self._skip and self._digest != self._saved_digest:
                log.warning("data.shuffle_rows: a data reader's row-shuffle block is not the one "
                            "it was saved in (more epochs at the data's end?); it reads the "
                            "block again from its start, repeating up to %d micro-batches' "
                            "rows (no data is lost)", self._skip)
                self._skip = 0
            if self._skip:  # their skip events went out with the block's first window
                self.producer.skips.clear()
            for window in shuffle_block(block, self.seed, self._row_tokens):
                self._emitted += 1
                if self._skip:
                    self._skip -= 1
                    continue
                yield window

    def state(self) -> dict[str, Any]:
        """Where the next window starts: after a whole block, the inner packer's state; inside
        one, the block's start, how many of its windows are done and the block's digest."""
        if self._emitted == self._size:
            return self.inner.state()
        return {**self._block_start, SKIP: self._emitted, BLOCK: self.block,
                DIGEST: self._digest}


def block_start(state: dict[str, Any]) -> dict[str, Any]:
    """A reader's saved ``state`` without its place inside a row-shuffle block: where a resume
    that cannot continue inside the block reads it again from."""
    return {k: v for k, v in state.items() if k not in (SKIP, BLOCK, DIGEST)}


def block_digest(block: list[Window]) -> str:
    """A short hash of ``block``'s windows (their tokens and row counts): a resume skips into a
    rebuilt block only when it is the saved one."""
    digest = hashlib.blake2b(digest_size=8)
    for window in block:
        digest.update(window.rows.to_bytes(8, "little"))
        digest.update(np.ascontiguousarray(window.tokens).tobytes())
    return digest.hexdigest()


def shuffle_block(block: list[Window], seed: int, row_tokens: int) -> list[Window]:
    """``block``'s rows permuted among its windows; window j keeps its row count and
    bookkeeping (module doc). ``row_tokens``: a flat window's stride from row to row."""
    rows, real = zip(*(rows_of(w, row_tokens) for w in block), strict=True)
    order = np.random.default_rng([seed, *block[0].start, _STREAM_TAG]).permutation(
        sum(w.rows for w in block))
    all_rows = np.concatenate(rows)[order]
    flat = real[0] is None and all_rows.shape[1] == row_tokens  # rows share no tokens
    if real[0] is not None:
        all_real = np.concatenate(real)[order]
    elif not flat:
        all_real = np.ones(all_rows.shape, bool)
    out, at = [], 0
    for w in block:
        part = slice(at, at + w.rows)
        tokens, mask = (all_rows[part].reshape(-1), None) if flat else (all_rows[part],
                                                                       all_real[part])
        out.append(Window(tokens, w.rows, w.start, w.consumed, w.source_tokens, mask, w.dropped))
        at += w.rows
    return out


def rows_of(window: Window, row_tokens: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A window's rows (rows, C) and their ``real`` mask (None for a flat window): a flat
    window of ``rows · row_tokens + overlap`` tokens has row i =
    tokens[i·row_tokens : (i+1)·row_tokens + overlap]."""
    if window.real is not None:
        return window.tokens, window.real
    width = window.tokens.size - (window.rows - 1) * row_tokens
    view = np.lib.stride_tricks.sliding_window_view(window.tokens, width)[::row_tokens]
    return view[: window.rows], None
