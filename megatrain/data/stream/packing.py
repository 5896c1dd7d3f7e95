"""Packing a reader's documents into fixed-size windows for an objective.

``Packer`` (the default) concatenates documents, each followed by EOS, into one token stream. A
micro-batch of B rows of T tokens is a window of ``B·T + overlap`` tokens; the next window starts
``B·T`` tokens later, so every token is trained on once (causal LM reads one token past its rows
for the shifted label: overlap 1).

``RowPacker`` (``data.pack_whole_docs``) never splits a document that fits in one row: a
document that does not fit in what is left of a row starts the next row, and the rest of the row
is padding (``real`` False there; the objective puts label -100 on it). A document longer than a
row fills the rest of the row and continues in the next ones (sharing ``overlap`` tokens).

Both report, per window, the documents whose EOS it consumed (its non-overlap part): the trace
keys. Each document's EOS is consumed exactly once, so each key appears once per epoch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatrain.data.stream.order import Doc, DocProducer


@dataclass(slots=True)
class Window:
    """A packed window: flat tokens (``real`` None) or padded rows (B, C) with their mask."""

    tokens: np.ndarray
    rows: int
    start: tuple[int, int, int, int]  # where it starts in the global order: seeds the objective
    consumed: list[Doc]  # the documents whose EOS this window consumed
    source_tokens: list[int]  # real tokens it consumed from each source
    real: np.ndarray | None = None
    dropped: int = 0  # samples it dropped (pretraining never drops; see ``tasks.TaskWindow``)


def copy_doc(out: np.ndarray, at: int, doc: Doc, offset: int, take: int, eos_id: int) -> None:
    """Write ``take`` tokens of ``doc`` (EOS appended) from ``offset`` into ``out[at:]``."""
    body = min(take, len(doc.tokens) - offset)
    if body > 0:
        out[at : at + body] = doc.tokens[offset : offset + body]
    if body < take:
        out[at + take - 1] = eos_id


class Packer:
    """Concatenating packer; ``state()`` after a window is where the next one starts."""

    def __init__(self, producer: DocProducer, *, row_tokens: int, rows: int, overlap: int,
                 eos_id: int) -> None:
        self.producer, self.row_tokens, self.rows = producer, row_tokens, rows
        self.overlap, self.eos_id = overlap, eos_id
        self._buffer: deque[Doc] = deque()
        self._offset = 0
        self._available = 0  # tokens buffered from the current position on
        self._sources = len(producer.cursors)

    def windows(self) -> Iterator[Window]:
        step = self.rows * self.row_tokens
        while True:
            if self._fill(step + self.overlap):
                yield self._take(self.rows)
                continue
            rows = (self._available - self.overlap) // self.row_tokens
            if rows > 0:  # a finite stream ends with the complete rows that remain
                yield self._take(rows)
            return

    def state(self) -> dict[str, Any]:
        doc = self._buffer[0] if self._buffer else None
        return self.producer.state_at(doc, self._offset if doc else 0)

    def _fill(self, need: int) -> bool:
        while self._available < need:
            doc = self.producer.next_doc()
            if doc is None:
                return False
            self._buffer.append(doc)
            self._available += doc.n
        return True

    def _take(self, rows: int) -> Window:
        size = rows * self.row_tokens + self.overlap
        out = np.empty(size, np.int64)
        filled, offset = 0, self._offset
        for doc in self._buffer:
            take = min(doc.n - offset, size - filled)
            copy_doc(out, filled, doc, offset, take, self.eos_id)
            filled, offset = filled + take, 0
            if filled == size:
                break
        start = self._buffer[0].seed_key(self._offset)
        consumed, per_source = self._advance(rows * self.row_tokens)
        return Window(out, rows, start, consumed, per_source)

    def _advance(self, step: int) -> tuple[list[Doc], list[int]]:
        consumed, per_source = [], [0] * self._sources
        self._available -= step
        while step > 0:
            doc = self._buffer[0]
            left = doc.n - self._offset
            if left > step:
                per_source[doc.src] += step
                self._offset += step
                break
            per_source[doc.src] += left
            step -= left
            consumed.append(self._buffer.popleft())
            self._offset = 0
        return consumed, per_source


class RowPacker:
    """Whole-document packer (see the module doc): rows of ``row_tokens + overlap`` tokens."""

    def __init__(self, producer: DocProducer, *, row_tokens: int, rows: int, overlap: int,
                 eos_id: int, pad_id: int) -> None:
        self.producer, self.rows, self.overlap = producer, rows, overlap
        self.capacity, self.eos_id, self.pad_id = row_tokens + overlap, eos_id, pad_id
        self._doc: Doc | None = None
        self._offset = 0
        self._sources = len(producer.cursors)

    def windows(self) -> Iterator[Window]:
        while self._current() is not None:
            out = np.full((self.rows, self.capacity), self.pad_id, np.int64)
            real = np.zeros((self.rows, self.capacity), bool)
            start = self._doc.seed_key(self._offset)
            consumed, per_source = [], [0] * self._sources
            rows = 0
            while rows < self.rows and self._fill_row(out[rows], real[rows], consumed, per_source):
                rows += 1
            yield Window(out[:rows], rows, start, consumed, per_source, real[:rows])

    def state(self) -> dict[str, Any]:
        return self.producer.state_at(self._doc, self._offset if self._doc else 0)

    def _current(self) -> Doc | None:
        if self._doc is None:
            self._doc, self._offset = self.producer.next_doc(), 0
        return self._doc

    def _fill_row(self, out: np.ndarray, real: np.ndarray, consumed: list[Doc],
                  per_source: list[int]) -> bool:
        """Fill one row from the current document on; False when the data has ended first."""
        filled, cap = 0, self.capacity
        while filled < cap:
            doc = self._current()
            if doc is None:
                return filled > 0
            left = doc.n - self._offset
            if left > cap - filled and filled > 0 and left <= cap:
                break  # fits a fresh row: never split it; pad this one
            take = min(left, cap - filled)
            copy_doc(out, filled, doc, self._offset, take, self.eos_id)
            real[filled : filled + take] = True
            per_source[doc.src] += take
            filled += take
            if take == left:
                consumed.append(doc)
                self._doc = None
            else:  # a document longer than a row continues, ``overlap`` tokens shared
                self._offset += take - self.overlap
                per_source[doc.src] -= self.overlap
        return True
