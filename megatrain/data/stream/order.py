"""A reader's documents: each source's global order, and a reader's position in it.

Order. Epoch ``e`` of source ``s`` permutes the source's shards with ``default_rng([seed, s, e])``
and the samples of shard ``i`` with ``default_rng([seed, s, e, i])``; concatenated, that is a
global order of the source's N samples, a function of (seed, source, epoch) only. Global index
``g`` of epoch ``e`` names one sample whatever the number of ranks and workers.

Position. A reader's position in a source is a queue of pieces ``[epoch, a, b, off]`` (global
indices ``a..b-1``, the first one ``off`` tokens in), then every epoch from ``next`` on as the
reader's normal share ``[r·N/R, (r+1)·N/R)``. A fresh reader is ``{"todo": [], "next": 0}``;
``megatrain.data.stream.elastic`` re-splits positions for a new number of readers. With several
sources a reader interleaves them by weight (``megatrain.data.stream.mixture.choose``); its position
also holds the tokens it has taken from each, which is all that choice depends on.

Every document carries the position from which it is the next one produced, so "document d,
``k`` tokens in" is a complete, JSON-able reader state: half-read documents survive a checkpoint.

Task samples (``megatrain-prepare --format``) carry their extra members (``Doc.extra``); a task
objective names the members it ``needs``, and a sample without them is skipped and counted like
an unreadable one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatrain.data.stream.elastic import share
from megatrain.data.stream.mixture import Source, choose
from megatrain.data.stream.shard_reader import DEFAULT_IO, Extra, ShardIO, ShardRead, read_shard
from megatrain.errors import DataError

Position = tuple[list, int, int, int]
"""(todo, item, g, next): a source cursor's queue, the piece and index it is at, next epoch."""


@dataclass(slots=True)
class Doc:
    """A document as the packer sees it: its tokens from ``off`` on (EOS not included)."""

    tokens: np.ndarray
    n: int  # len(tokens) + 1: the EOS the packer appends
    key: str
    src: int
    epoch: int
    g: int
    off: int
    snap: tuple[Position, ...]  # every source's position before this document was produced
    counts: tuple[int, ...]  # tokens taken from each source before it
    extra: Extra | None = None  # a task sample's extra members (None: pretraining)

    def seed_key(self, offset: int) -> tuple[int, int, int, int]:
        """Where ``offset`` tokens into this document lies in the global order."""
        return self.src, self.epoch, self.g, self.off + offset


class EpochOrder:
    """Global index → (shard, sample) for one source and epoch."""

    def __init__(self, counts: Sequence[int], *, seed: int, source: int, epoch: int,
                 shuffle: bool) -> None:
        self.key, self.shuffle = (seed, source, epoch), shuffle
        n = len(counts)
        rng = np.random.default_rng(list(self.key))
        self.shards = rng.permutation(n) if shuffle else np.arange(n)
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64)[self.shards])])
        self._counts = counts
        self._samples: dict[int, np.ndarray] = {}

    def locate(self, g: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.starts, g, side="right")) - 1
        shard = int(self.shards[k])
        return shard, int(self.samples(shard)[g - int(self.starts[k])])

    def samples(self, shard: int) -> np.ndarray:
        if shard not in self._samples:
            n = self._counts[shard]
            self._samples[shard] = (np.random.default_rng([*self.key, shard]).permutation(n)
                                    if self.shuffle else np.arange(n))
        return self._samples[shard]


SkipEvent = tuple[int, str, str]  # (epoch, shard name, reason)
MEMBER_FILES = {"mask": "mask.npy", "target": "target.npy", "cls": "cls"}
"""A task sample's extra members (``Doc.extra`` keys) and the tar members they come from."""


@dataclass
class SkipGuard:
    """A reader's own count of unreadable samples per epoch. The rank counts skips as batches
    arrive; a reader whose shards all fail yields no batch, so it must stop itself: past
    ``limit`` (the rank's budget, which its own count can't exceed without the rank's doing so),
    or after a whole epoch with nothing readable."""

    limit: float = math.inf
    fraction: float = 1.0  # data.max_skip_fraction, for the message
    skipped: Counter = field(default_factory=Counter)
    bad: dict[str, str] = field(default_factory=dict)

    def note(self, epoch: int, shard: str, reason: str) -> None:
        self.skipped[epoch] += 1
        self.bad.setdefault(shard, reason)
        if self.skipped[epoch] > self.limit:
            self.fail(f"{self.skipped[epoch]} unreadable samples in epoch {epoch}, more than "
                      f"data.max_skip_fraction={self.fraction} of its rank's share")

    def fail(self, what: str) -> None:
        shards = "; ".join(f"{name} ({why})" for name, why in sorted(self.bad.items()))
        raise DataError(f"a data reader found {what}; bad shards: {shards}")


class SourceCursor:
    """One source as seen by one reader: yields its documents in order, skipping bad samples
    (recorded in ``skips``) and task samples that lack a member in ``needs``."""

    def __init__(self, source: Source, index: int, *, seed: int, shuffle: bool, reader: int,
                 num_readers: int, state: dict[str, Any], skips: list[SkipEvent],
                 io: ShardIO, guard: SkipGuard, needs: tuple[str, ...] = ()) -> None:
        self.source, self.index, self.seed, self.shuffle = source, index, seed, shuffle
        self.io, self.guard, self.needs = io, guard, needs
        self._epoch_docs: int | None = None  # documents produced in the epoch begun here
        self.reader, self.num_readers, self.skips = reader, num_readers, skips
        self.counts = [s.samples for s in source.shards]
        self.total = sum(self.counts)
        self.todo = [tuple(int(x) for x in p) for p in state["todo"] if int(p[2]) > int(p[1])]
        self.next = int(state["next"])
        self.item, self.g = 0, self.todo[0][1] if self.todo else 0
        self._orders: dict[int, EpochOrder] = {}
        self._shard: tuple[int, ShardRead] | None = None

    def position(self) -> Position:
        return self.todo, self.item, self.g, self.next

    def next_doc(self) -> tuple[np.ndarray, str, int, int, int, Position, Extra | None] | None:
        """(tokens from the start offset, key, epoch, g, start offset, position before it, the
        sample's extra members)."""
        while True:
            if self.item >= len(self.todo):
                if not self._next_epoch():
                    return None
                continue  # a new epoch's share may be empty (fewer samples than readers)
            e, a, b, off = self.todo[self.item]
            g, pos = self.g, self.position()
            self.g += 1
            if self.g >= b:
                self.item += 1
                self.g = self.todo[self.item][1] if self.item < len(self.todo) else 0
            tokens, key, extra = self._sample(e, g)
            if tokens is not None:
                if self._epoch_docs is not None:
                    self._epoch_docs += 1
                start = off if g == a else 0
                return tokens[start:], key, e, g, start, pos, extra

    def _next_epoch(self) -> bool:
        if self._epoch_docs == 0 and self.guard.skipped[self.next - 1]:
            self.guard.fail(f"nothing readable in its share of epoch {self.next - 1} of "
                            f"{self.source.name}")
        if self.source.epochs is not None and self.next >= self.source.epochs:
            return False
        self._epoch_docs = 0
        lo, hi = share(self.total, self.reader, self.num_readers)
        self.todo = [(self.next, lo, hi, 0)] if hi > lo else []
        self.item, self.g, self.next = 0, lo, self.next + 1
        return True

    def _sample(self, epoch: int, g: int) -> tuple[np.ndarray | None, str, Extra | None]:
        order = self._orders.get(epoch)
        if order is None:
            self._orders = {epoch: EpochOrder(self.counts, seed=self.seed, source=self.index,
                                              epoch=epoch, shuffle=self.shuffle)}
            order = self._orders[epoch]
        shard, sample = order.locate(g)
        if self._shard is None or self._shard[0] != shard:
            info = self.source.shards[shard]
            self._shard = shard, read_shard(info, self.io)
        read, name = self._shard[1], self.source.shards[shard].name
        tokens, extra, reason = read.tokens[sample], read.extras[sample], None
        if tokens is None:
            reason = read.errors[0] if read.errors else "unreadable sample"
        elif self.needs and (extra is None or not extra.keys() >= set(self.needs)):
            missing = ", ".join(MEMBER_FILES[m] for m in self.needs if m not in (extra or {}))
            tokens, reason = None, (f"{name}:{read.keys[sample]}: no {missing} member (not a "
                                    "task sample of megatrain-prepare --format)")
        if reason is not None:
            self.skips.append((epoch, name, reason))
            self.guard.note(epoch, name, reason)
        return tokens, read.keys[sample], extra


def fresh_reader_state(num_sources: int) -> dict[str, Any]:
    return {"sources": [{"todo": [], "next": 0} for _ in range(num_sources)],
            "counts": [0] * num_sources}


class DocProducer:
    """A reader's document stream over its sources; ``state_at`` turns any produced document
    (and a token offset into it) back into a reader state."""

    def __init__(self, sources: Sequence[Source], state: dict[str, Any], *, seed: int,
                 shuffle: bool, reader: int, num_readers: int, io: ShardIO = DEFAULT_IO,
                 guard: SkipGuard | None = None, needs: tuple[str, ...] = ()) -> None:
        self.skips: list[SkipEvent] = []
        guard = guard or SkipGuard()
        self.cursors = [
            SourceCursor(src, i, seed=seed, shuffle=shuffle, reader=reader,
                         num_readers=num_readers, state=state["sources"][i], skips=self.skips,
                         io=io, guard=guard, needs=needs)
            for i, src in enumerate(sources)
        ]
        self.weights = [s.weight for s in sources]
        self.active = [True] * len(sources)
        self.counts = [int(c) for c in state["counts"]]
        self.names = [s.name for s in sources]

    def next_doc(self) -> Doc | None:
        while True:
            s = 0 if len(self.cursors) == 1 and self.active[0] else choose(
                self.counts, self.weights, self.active)
            if s is None:
                return None
            got = self.cursors[s].next_doc()
            if got is None:
                self.active[s] = False
                continue
            tokens, key, epoch, g, off, pos, extra = got
            snap = tuple(pos if i == s else c.position() for i, c in enumerate(self.cursors))
            counts = tuple(self.counts)
            self.counts[s] += off + len(tokens) + 1  # whole documents: replays choose exactly
            if len(self.names) > 1:
                key = f"{self.names[s]}/{key}"
            return Doc(tokens, len(tokens) + 1, key, s, epoch, g, off, snap, counts, extra)

    def state_at(self, doc: Doc | None, offset: int = 0) -> dict[str, Any]:
        """The reader state from which the next token produced is ``doc``'s token ``offset``
        (``None``: the producer's current position)."""
        snap = doc.snap if doc else tuple(c.position() for c in self.cursors)
        counts = doc.counts if doc else tuple(self.counts)
        sources = []
        for i, (todo, item, g, nxt) in enumerate(snap):
            pieces = [list(p) for p in todo[item:]]
            if pieces:
                e, a, b, off = pieces[0]
                off = off if g == a else 0
                if doc is not None and i == doc.src:
                    off = doc.off + offset
                pieces[0] = [e, g, b, off]
            sources.append({"todo": pieces, "next": nxt})
        return {"sources": sources, "counts": list(counts)}
