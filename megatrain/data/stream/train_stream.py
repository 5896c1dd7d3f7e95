"""Deterministic, elastic, resumable, packed stream of training batches over prepared shards.

Order (``megatrain.data.stream.order``). Each epoch's order of a source's samples is a function of
(seed, source, epoch) only, over a global sample index. There are R = world_size ×
max(1, num_workers) readers; reader ``r = rank × W + worker`` reads ``[r·N/R, (r+1)·N/R)`` of
each epoch (of each source, interleaved by weight in a mixture: ``megatrain.data.stream.mixture``).

Packing (``megatrain.data.stream.packing``). A reader packs its documents into windows that the
objective (``megatrain.data.stream.objectives``) turns into tensors; the objective's random draws are
seeded by where the window starts in the global order, so a resume or another world size draws
the same masks for the same window. ``data.shuffle_rows=K`` shuffles the rows of K consecutive
windows of a reader among them (``megatrain.data.stream.row_shuffle``). Task objectives
(``megatrain.data.stream.tasks``: sft, cls, seq2seq) pack whole samples instead; a sample left
with nothing to train on is dropped and counted (``data_dropped``).

Epochs. ``epochs=N`` reads every source for exactly N epochs, then the iterator ends (a reader's
rows run on from one epoch into the next, so the last micro-batch may have fewer rows, and ranks
may end at different micro-batches: the trainer's ``epochs.FiniteBatches`` has them agree; the
concatenating packer leaves out a reader's last partial row). ``estimate_batches`` tells from
the manifest's counts how many micro-batches each rank yields. Without ``epochs`` the stream is infinite.

State. A reader's state is its remaining work: per source, the pieces of the global order it
still has to read (the first one possibly a token offset into a half-read document), then whole
epochs from ``next`` on, plus the tokens it has taken from each source (inside a row-shuffle
block: the block's start and its windows already handed out). The stream's state is its
readers' states and how many batches were consumed (the DataLoader hands batches out
round-robin from workers 0..W-1; on an exact resume worker 0 plays the reader whose turn it
is: the one after the reader that served the last batch, readers that have ended being skipped).
``load_state_dict`` takes this rank's state (same world size and workers: bit-identical
continuation) or *every* old rank's state (any layout: the remaining work is re-split,
``megatrain.data.stream.elastic``, so no sample of the epoch is repeated or dropped).

Faults (``megatrain.data.stream.shard_reader``). Bad samples are skipped and counted; past
``max_skip_fraction`` of an epoch's samples (this rank's share) the stream raises a DataError
naming the shards. Keys of the documents each batch consumed travel with it (``pop_trace``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import signal
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatrain.data.manifest import Manifest, ShardInfo
from megatrain.data.stream.elastic import merge_readers, share
from megatrain.data.stream.mixture import Source
from megatrain.data.stream.objectives import CausalLM, Objective, padded_batch
from megatrain.data.stream.order import DocProducer, SkipEvent, SkipGuard, fresh_reader_state
from megatrain.data.stream.packing import Packer, RowPacker, Window
from megatrain.data.stream.row_shuffle import BLOCK, DIGEST, SKIP, RowShuffler, block_start
from megatrain.data.stream.shard_reader import DEFAULT_IO, ShardIO
from megatrain.data.stream.tasks import SamplePacker, TaskObjective, TaskWindow
from megatrain.errors import ConfigError, DataError

log = logging.getLogger("megatrain")
STATE_VERSION = 2
LAYOUT = ("rank", "world_size", "num_workers")
BatchInfo = tuple[list[str], list[int], list[int], list[SkipEvent], int]
"""(consumed document keys, their epochs, tokens taken from each source, skipped samples,
dropped samples)."""


# --- the training stream --------------------------------------------------------------------


@dataclass(frozen=True)
class StreamConfig:
    """Everything that determines a rank's batches; saved with the state and checked on load."""

    sources: tuple[Source, ...]
    corpus: str
    split: str
    eos_id: int
    seq_len: int
    micro_batch_size: int
    seed: int
    rank: int
    world_size: int
    num_workers: int
    shuffle: bool
    objective: Objective
    pack_whole_docs: bool = False
    pad_id: int = -1
    max_skip_fraction: float = 1.0
    io: ShardIO = DEFAULT_IO
    epochs: int | None = None  # every source's epochs (already in ``sources``); None: infinite
    shuffle_rows: int = 1  # rows shuffled among this many windows per reader (row_shuffle.py)

    @property
    def readers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def num_readers(self) -> int:
        return self.world_size * self.readers_per_rank

    @property
    def skip_budget(self) -> float:
        """The unreadable samples this rank may skip per epoch."""
        return self.max_skip_fraction * sum(s.samples for s in self.sources) / self.world_size

    def identity(self) -> dict[str, Any]:
        """The fields a saved state must agree on (anything but the layout) to resume."""
        keys = ("corpus", "split", "seq_len", "seed", "shuffle", "pack_whole_docs")
        return {**{k: getattr(self, k) for k in keys}, "objective": self.objective.name}

    def layout(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in LAYOUT}


AnyPacker = Packer | RowPacker | SamplePacker | RowShuffler


def make_packer(cfg: StreamConfig, state: dict[str, Any], reader: int,
                num_readers: int) -> AnyPacker:
    """Reader ``reader``'s packer, positioned at ``state`` (a row-shuffle block's start and
    the windows of it already emitted, with ``data.shuffle_rows``)."""
    obj = cfg.objective
    producer = DocProducer(cfg.sources, state, seed=cfg.seed, shuffle=cfg.shuffle,
                           reader=reader, num_readers=num_readers, io=cfg.io,
                           guard=SkipGuard(cfg.skip_budget, cfg.max_skip_fraction),
                           needs=obj.needs if isinstance(obj, TaskObjective) else ())
    packer = packer_for(producer, obj, cfg.micro_batch_size, cfg.eos_id,
                        pad_id=cfg.pad_id if cfg.pack_whole_docs else None)
    if cfg.shuffle_rows == 1:
        return packer
    return RowShuffler(packer, block=cfg.shuffle_rows, seed=cfg.seed,
                       skip=int(state.get(SKIP, 0)), digest=state.get(DIGEST))


def packer_for(producer: DocProducer, objective: Objective, rows: int, eos_id: int, *,
               pad_id: int | None = None) -> AnyPacker:
    """The packer ``objective`` reads through: whole samples for a task objective, whole
    documents padded with ``pad_id`` (EOS if the tokenizer has none) when it is given
    (``data.pack_whole_docs``), else the concatenating packer."""
    if isinstance(objective, TaskObjective):
        return SamplePacker(producer, objective, rows=rows)
    common = {"row_tokens": objective.row_tokens, "rows": rows, "overlap": objective.overlap,
              "eos_id": eos_id}
    if pad_id is not None:
        return RowPacker(producer, pad_id=pad_id if pad_id >= 0 else eos_id, **common)
    return Packer(producer, **common)


def window_batch(window: Window | TaskWindow, objective: Objective,
                 seed: int) -> dict[str, torch.Tensor]:
    """The objective's batch of a window, its random draws seeded by where the window starts
    (task objectives draw nothing)."""
    if isinstance(window, TaskWindow):
        return objective.collate(window.rows)
    rng = np.random.default_rng([seed, *window.start])
    if window.real is None:
        return objective.batch(window.tokens, window.rows, rng)
    return padded_batch(objective, window.tokens, window.real, rng)


def _narrow(ids: np.ndarray) -> np.ndarray:
    """int64 ids (and -100 labels) as int32: half the bytes through the pipe."""
    if ids.dtype != np.int64:
        raise TypeError(f"a batch holds {ids.dtype}; the stream ships int64 ids only")
    return ids.astype(np.int32)


class Shipped:
    """A worker's item with the batch as raw bytes. The DataLoader passes an object it does not
    know through the worker pipe as one pickle; tensors would each get a shared-memory segment
    and a file descriptor, ~1.5 ms per tensor on a busy 2-core machine (5x the whole batch)."""

    __slots__ = ("info", "local", "parts", "state")

    def __init__(self, batch: dict[str, torch.Tensor], local: int, state: Any, info: Any) -> None:
        self.parts = [(k, tuple(v.shape), _narrow(v.numpy()).tobytes()) for k, v in batch.items()]
        self.local, self.state, self.info = local, state, info

    def unpack(self) -> tuple[dict[str, torch.Tensor], int, Any, Any]:
        batch = {k: torch.from_numpy(np.frombuffer(data, np.int32).reshape(shape).astype(np.int64))
                 for k, shape, data in self.parts}
        return batch, self.local, self.state, self.info


class Opaque:
    """An in-process item, wrapped so that the DataLoader's ``default_convert`` does not walk
    the reader state and keys (~0.2 ms per batch in a profile: as much as the stream's work)."""

    __slots__ = ("item",)

    def __init__(self, *item: Any) -> None:
        self.item = item

    def unpack(self) -> tuple[Any, ...]:
        return self.item


class PackedDataset(IterableDataset):
    """One reader per DataLoader worker; yields ``(batch, local reader, state after, info)``
    wrapped (``Shipped`` from a worker process, ``Opaque`` in-process), or ``(None, local
    reader, None, message)`` when the reader failed."""

    def __init__(self, config: StreamConfig, states: list[dict[str, Any]], rotation: int) -> None:
        super().__init__()
        self.config, self.states, self.rotation = config, states, rotation

    def __iter__(self) -> Iterator[tuple[Any, int, Any, Any]]:
        cfg = self.config
        info = get_worker_info()
        local = ((info.id if info else 0) + self.rotation) % cfg.readers_per_rank
        try:
            packer = make_packer(cfg, self.states[local], cfg.rank * cfg.readers_per_rank + local,
                                 cfg.num_readers)
            skips = packer.producer.skips
            for window in packer.windows():
                batch = window_batch(window, cfg.objective, cfg.seed)
                info_out: BatchInfo = ([d.key for d in window.consumed],
                                       [d.epoch for d in window.consumed],
                                       window.source_tokens, skips[:], window.dropped)
                skips.clear()
                item = (batch, local, packer.state(), info_out)
                yield Shipped(*item) if info is not None else Opaque(*item)
        except DataError as exc:
            yield Opaque(None, local, None, str(exc))


def _ignore_stop_signals(worker_id: int) -> None:
    """A scheduler's SIGTERM / SIGUSR1 reaches the whole process group: the trainer handles it
    and saves; its loader workers must keep serving until then."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class TrainStream:
    """This rank's stream of micro-batches (the objective's dict of LongTensors (B, ...)):
    infinite, or ending after ``config.epochs`` epochs.

    ``state_dict()`` is the position after the last batch handed out; a fresh stream given it by
    ``load_state_dict()`` continues with exactly the batches an uninterrupted one would yield.
    """

    def __init__(self, config: StreamConfig, *, pin_memory: bool = False) -> None:
        self.config = config
        self.pin_memory = pin_memory
        self._states = [fresh_reader_state(len(config.sources))
                        for _ in range(config.readers_per_rank)]
        self._consumed = 0
        self._keys: list[str] = []
        self._key_epochs: list[int] = []
        self._tokens = [0] * len(config.sources)
        self._skipped: Counter[int] = Counter()  # by epoch
        self._bad_shards: dict[str, str] = {}
        self._dropped = 0  # task samples with nothing to train on
        self._turn = 0  # the local reader that serves the next batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.config
        dataset = PackedDataset(cfg, [dict(s) for s in self._states], self._turn)
        loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                            persistent_workers=False, worker_init_fn=_ignore_stop_signals)
        for item in loader:
            batch, local, state, info = item.unpack()
            if batch is None:
                raise DataError(info)
            if self.pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            self._states[local] = state
            self._consumed += 1
            self._turn = (local + 1) % cfg.readers_per_rank  # a reader that has ended is skipped
            self._account(info)
            yield batch
        if cfg.epochs is not None:
            return
        names = ", ".join(f"{s.name} ({s.epochs} epochs)" for s in cfg.sources)
        raise DataError(f"the training data ran out: every source reached its epochs limit "
                        f"({names}); raise the limits or lower trainer.max_steps")

    def _account(self, info: BatchInfo) -> None:
        keys, epochs, tokens, skips, dropped = info
        self._dropped += dropped
        self._keys += keys
        self._key_epochs += epochs
        for i, n in enumerate(tokens):
            self._tokens[i] += n
        for epoch, shard, reason in skips:
            self._skipped[epoch] += 1
            self._bad_shards.setdefault(shard, reason)
            if self._skipped[epoch] > self.config.skip_budget:
                self._over_budget(epoch)

    def _over_budget(self, epoch: int) -> None:
        shards = "; ".join(f"{name} ({why})" for name, why in sorted(self._bad_shards.items()))
        raise DataError(
            f"rank {self.config.rank} skipped {self._skipped[epoch]} unreadable samples in epoch "
            f"{epoch}, more than data.max_skip_fraction={self.config.max_skip_fraction} of its "
            f"share; bad shards: {shards}")

    def pop_trace(self) -> tuple[list[str], list[int]]:
        """Keys (and epochs) of the documents consumed since the last call: host lists, no sync."""
        keys, epochs = self._keys, self._key_epochs
        self._keys, self._key_epochs = [], []
        return keys, epochs

    def metrics(self) -> dict[str, float]:
        """This rank's counters: skipped samples, dropped task samples, and tokens per source
        in a mixture."""
        row = {"data_skipped": float(sum(self._skipped.values()))}
        if isinstance(self.config.objective, TaskObjective):
            row["data_dropped"] = float(self._dropped)
        if len(self.config.sources) > 1:
            row |= {f"tokens/{s.name}": float(n)
                    for s, n in zip(self.config.sources, self._tokens, strict=True)}
        return row

    def state_dict(self) -> dict[str, Any]:
        """Small and JSON-able: identity, layout, batches consumed, reader positions, counters."""
        return {
            "version": STATE_VERSION,
            **self.config.identity(),
            **self.config.layout(),
            "sources": [s.name for s in self.config.sources],
            "consumed": self._consumed,
            "turn": self._turn,
            "readers": [dict(s) for s in self._states],
            "tokens": list(self._tokens),
            "skipped": {str(e): n for e, n in self._skipped.items()},
            "bad_shards": dict(self._bad_shards),
            "dropped": self._dropped,
        }

    def needs_every_rank(self, own: dict[str, Any]) -> bool:
        """Whether resuming from this rank's saved state ``own`` needs every old rank's state
        too (the world size or worker count changed)."""
        return {k: own.get(k) for k in LAYOUT} != self.config.layout()

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Resume from this rank's saved state, or from every old rank's (a list, any order).

        The same layout (world size, workers) continues bit-identically; another layout needs
        all old ranks' states and continues the same epochs without repeating or dropping a
        sample. DataError naming each setting that differs otherwise.
        """
        states = [state] if isinstance(state, dict) else list(state)
        for s in states:
            self._check(s)
        own = [s for s in states if {k: s[k] for k in LAYOUT} == self.config.layout()]
        if own:
            self._restore(own[0], self._block_starts(own[0]["readers"], same_layout=True),
                          int(own[0]["consumed"]))
        else:
            self._reshard(states)

    def _block_starts(self, readers: list[dict[str, Any]], *,
                      same_layout: bool) -> list[dict[str, Any]]:
        """``readers`` as they resume: a reader saved inside a ``data.shuffle_rows`` block keeps
        its windows-done count on the same layout and block size; otherwise it reads the block
        again from its start (positions only: nothing lost, at most block - 1 micro-batches'
        rows repeated per reader), and one warning says so."""
        block = self.config.shuffle_rows
        out, repeats = [], []
        for reader in readers:
            skip = int(reader.get(SKIP, 0))
            if skip and not (same_layout and int(reader.get(BLOCK, 0)) == block > 1):
                repeats.append(skip)
                reader = block_start(reader)
            out.append(reader)
        if repeats:
            log.warning(
                "data.shuffle_rows: %d data reader(s) were saved inside a row-shuffle block, "
                "which %s cannot continue; they read the block again from its start, repeating "
                "up to %d micro-batches' rows each (no data is lost)", len(repeats),
                "another data.shuffle_rows" if same_layout else
                "another layout (world size or data workers)", max(repeats))
        return out

    def _check(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"unsupported data stream state version {state.get('version')!r} "
                            f"(this megatrain reads version {STATE_VERSION})")
        diffs = [f"{k}: saved {state.get(k)!r}, now {v!r}"
                 for k, v in self.config.identity().items() if state.get(k) != v]
        if diffs:
            raise DataError("cannot resume the data stream; it was saved with different "
                            "settings (" + "; ".join(diffs) + ")")

    def _restore(self, state: dict[str, Any], readers: list[dict], consumed: int) -> None:
        self._states = [dict(r) for r in readers]
        self._consumed = consumed
        self._turn = int(state.get("turn", consumed % self.config.readers_per_rank))
        self._dropped = int(state.get("dropped", 0))
        self._tokens = [int(n) for n in state.get("tokens", self._tokens)]
        self._skipped = Counter({int(e): int(n) for e, n in state.get("skipped", {}).items()})
        self._bad_shards = dict(state.get("bad_shards", {}))

    def _reshard(self, states: list[dict[str, Any]]) -> None:
        states = sorted(states, key=lambda s: s["rank"])
        old_world = states[0]["world_size"]
        if [s["rank"] for s in states] != list(range(old_world)) or any(
                (s["world_size"], s["num_workers"]) != (old_world, states[0]["num_workers"])
                for s in states):
            raise DataError(
                f"resuming the data stream on world_size={self.config.world_size}, num_workers="
                f"{self.config.num_workers} needs the saved state of every rank of the old run "
                f"(world_size={old_world}); got ranks {[s['rank'] for s in states]}")
        cfg = self.config
        old = self._block_starts([r for s in states for r in s["readers"]], same_layout=False)
        readers = merge_readers(old,
                                samples=[s.samples for s in cfg.sources],
                                new_readers=cfg.num_readers,
                                epochs=[s.epochs for s in cfg.sources])
        mine = readers[cfg.rank * cfg.readers_per_rank:(cfg.rank + 1) * cfg.readers_per_rank]
        totals = {"tokens": [sum(int(s["tokens"][i]) for s in states)
                             for i in range(len(cfg.sources))],
                  "skipped": dict(sum((Counter({int(e): n for e, n in s["skipped"].items()})
                                       for s in states), Counter())),
                  "bad_shards": {k: v for s in states for k, v in s["bad_shards"].items()},
                  "dropped": sum(int(s.get("dropped", 0)) for s in states)}
        self._restore(totals if cfg.rank == 0 else {}, mine, 0)  # rank 0 carries the counters


def build_train_stream(
    manifest: Manifest,
    *,
    split: str = "train",
    seq_len: int,
    micro_batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int,
    shuffle: bool = True,
    pin_memory: bool = False,
    objective: Objective | None = None,
    sources: Sequence[Source] | None = None,
    pack_whole_docs: bool = False,
    max_skip_fraction: float = 1.0,
    io: ShardIO = DEFAULT_IO,
    epochs: int | None = None,
    shuffle_rows: int = 1,
) -> TrainStream:
    """The training stream of ``rank`` over ``manifest``'s ``split`` shards, or over a mixture
    of ``sources`` (prepared with ``manifest``'s tokenizer); ``objective`` defaults to causal LM
    over ``seq_len``; ``io`` says how shards at URLs are fetched; ``epochs``: read every source
    that many times, then end (None: forever); ``shuffle_rows``: the rows of this many
    consecutive micro-batches of a reader are shuffled among them (1: off)."""
    _check_stream_args(seq_len, micro_batch_size, seed, rank, world_size, num_workers)
    if not 0 <= max_skip_fraction <= 1:
        raise ConfigError(f"data.max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
    objective = objective or CausalLM(seq_len, manifest.eos_id)
    if pack_whole_docs and objective.name not in ("clm", "mlm"):
        raise ConfigError(f"data.pack_whole_docs supports clm and mlm, not {objective.name}")
    _check_shuffle_rows(shuffle_rows, objective)
    check_task_format(manifest, objective)
    sources = tuple(sources or (Source(manifest.name, tuple(manifest.shards(split))),))
    corpus = corpus_fingerprint(sources)  # before the run's epochs: a run may add epochs later
    sources = with_epochs(sources, epochs)
    config = StreamConfig(
        sources=sources, corpus=corpus, split=split,
        eos_id=manifest.eos_id, seq_len=seq_len, micro_batch_size=micro_batch_size, seed=seed,
        rank=rank, world_size=world_size, num_workers=num_workers, shuffle=shuffle,
        objective=objective, pack_whole_docs=pack_whole_docs,
        pad_id=int(manifest.tokenizer.get("pad_id", -1)), max_skip_fraction=max_skip_fraction,
        io=io, epochs=epochs, shuffle_rows=shuffle_rows,
    )
    for source in sources:
        if source.samples < config.num_readers:
            raise DataError(
                f"split {split!r} of {source.name} has {source.samples} samples, fewer than its "
                f"{config.num_readers} readers (world_size × num_workers); use fewer data workers")
    return TrainStream(config, pin_memory=pin_memory)


def _check_shuffle_rows(shuffle_rows: int, objective: Objective) -> None:
    """ConfigError for a block below 1, or a shuffle of task rows (whole samples, each row
    already from its own place in the shuffled order)."""
    if shuffle_rows < 1:
        raise ConfigError(f"data.shuffle_rows must be >= 1, got {shuffle_rows}")
    if shuffle_rows > 1 and isinstance(objective, TaskObjective):
        raise ConfigError(f"data.shuffle_rows applies to packed pretraining objectives, not "
                          f"{objective.name} (its rows are whole samples already)")


def with_epochs(sources: Sequence[Source], epochs: int | None) -> tuple[Source, ...]:
    """``sources``, each read ``epochs`` times (None: as they are); ConfigError for a mixture
    source whose own epochs limit says otherwise."""
    if epochs is None:
        return tuple(sources)
    if epochs < 1:
        raise ConfigError(f"trainer.epochs must be >= 1, got {epochs}")
    for source in sources:
        if source.epochs not in (None, epochs):
            raise ConfigError(f"data.mixture source {source.name} has epochs: {source.epochs}, "
                              f"but trainer.epochs={epochs} reads every source {epochs} times; "
                              "drop the source's epochs")
    return tuple(replace(s, epochs=epochs) for s in sources)


def check_task_format(manifest: Manifest, objective: Objective) -> None:
    """ConfigError when a task objective meets a pretraining corpus or one prepared for another
    task (the manifest's ``task.format``)."""
    if not isinstance(objective, TaskObjective):
        return
    if manifest.task is None:
        raise ConfigError(f"data.objective={objective.name} needs task data; {manifest.root} is "
                          f"a pretraining corpus (prepare one with megatrain-prepare --format "
                          f"{objective.name})")
    if manifest.task["format"] != objective.name:
        raise ConfigError(f"data.objective={objective.name} does not fit {manifest.root}: it "
                          f"was prepared with --format {manifest.task['format']}")


def _check_stream_args(
    seq_len: int, micro_batch_size: int, seed: int, rank: int, world_size: int, num_workers: int
) -> None:
    if seq_len < 1 or micro_batch_size < 1:
        raise ConfigError(
            f"seq_len and micro_batch_size must be positive, got {seq_len}, {micro_batch_size}"
        )
    if seed < 0:
        raise ConfigError(f"the data seed must be non-negative, got {seed}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in a world of size {world_size}")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be non-negative, got {num_workers}")


def corpus_fingerprint(sources: Sequence[Source] | Sequence[ShardInfo]) -> str:
    """A short hash of the sources' shard lists and weights: a saved position only means
    something on the same data."""
    digest = hashlib.sha256()
    for source in sources:
        if isinstance(source, ShardInfo):
            digest.update(f"{source.name}:{source.sha256}\n".encode())
            continue
        digest.update(f"source {source.name} {source.weight} {source.epochs}\n".encode())
        for shard in source.shards:
            digest.update(f"{shard.name}:{shard.sha256}\n".encode())
    return digest.hexdigest()[:16]


# --- how many batches: from the manifest's counts ------------------------------------------


class BatchCount(NamedTuple):
    """Micro-batches each rank yields (index = rank) and whether that is exact."""

    per_rank: list[int]
    exact: bool  # one sample per row: exact but for dropped and skipped samples


def estimate_batches(
    sources: Manifest | Sequence[Source],
    objective: Objective,
    *,
    micro_batch_size: int,
    world_size: int,
    num_workers: int,
    epochs: int = 1,
    split: str = "train",
    pack_whole_docs: bool = False,
) -> BatchCount:
    """The micro-batches each rank yields over ``epochs`` epochs, from the manifest's sample and
    token counts alone (no shard is read).

    Exact where every row holds one sample (cls, seq2seq, sft without packing): a reader's rows
    are its samples, ``ceil(rows / micro_batch_size)`` batches (the batches run on across epoch
    boundaries, so N epochs may take fewer than N times one). Estimated from the token counts
    where rows are packed: whole samples (packed sft, ``pack_whole_docs``) leave about half a
    sample of padding per row (within ~10% when samples are shorter than a row, up to ~20% over
    when many are longer); the concatenating packer wastes nothing but a reader's last partial
    row. A reader's share of a source's tokens is taken as its share of the samples.
    """
    if isinstance(sources, Manifest):
        sources = (Source(sources.name, tuple(sources.shards(split))),)
    readers = max(1, num_workers)
    per_rank = []
    for rank in range(world_size):
        total = 0
        for local in range(readers):
            reader = rank * readers + local
            samples, tokens = 0, 0.0
            for source in sources:
                lo, hi = share(source.samples, reader, world_size * readers)
                samples += hi - lo
                tokens += sum(s.tokens for s in source.shards) * (hi - lo) / max(1, source.samples)
            rows = _rows(objective, epochs * samples, epochs * tokens, pack_whole_docs)
            total += math.ceil(rows / micro_batch_size)
        per_rank.append(total)
    one_per_row = isinstance(objective, TaskObjective) and not objective.packing
    return BatchCount(per_rank, one_per_row)


def _rows(objective: Objective, samples: int, tokens: float, whole: bool) -> float:
    """The rows ``samples`` of ``tokens`` in all fill (see ``estimate_batches``)."""
    if isinstance(objective, TaskObjective) and not objective.packing:
        return samples
    if samples == 0:
        return 0
    if isinstance(objective, TaskObjective):
        # packed sft: a sample takes a position per token (its EOS is only a label), seq_len at most
        capacity = objective.seq_len
        used, most = min(tokens, samples * capacity), samples
    elif whole:  # a document longer than a row runs on into the next
        capacity, used, most = objective.row_tokens + objective.overlap, tokens + samples, math.inf
    else:
        return max(0, (tokens + samples - objective.overlap) // objective.row_tokens)
    waste = min(used / samples, capacity / 2) / 2  # a row's end: half a sample that won't fit
    return min(most, math.ceil(used / (capacity - waste)))


def estimate_batches_per_epoch(sources: Manifest | Sequence[Source], objective: Objective, *,
                               epochs: int = 1, **layout: Any) -> float:
    """The micro-batches per epoch of the rank that yields the most, averaged over ``epochs``
    epochs (``estimate_batches``): what a schedule over ``epochs`` epochs should plan for."""
    count = estimate_batches(sources, objective, epochs=epochs, **layout)
    return max(count.per_rank) / epochs


# --- evaluation -----------------------------------------------------------------------------


def iter_eval_batches(
    manifest: Manifest,
    *,
    split: str = "eval",
    seq_len: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    max_batches: int | None = None,
    objective: Objective | None = None,
    io: ShardIO = DEFAULT_IO,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of ``split`` in natural order, packed, one pass, in-process.

    Ends after ``max_batches`` or at the end of the data; the last batch may have fewer rows and
    ranks may get different numbers of batches (reduce sums once at the end, not per batch).
    """
    _check_stream_args(seq_len, micro_batch_size, 0, rank, world_size, 0)
    objective = objective or CausalLM(seq_len, manifest.eos_id)
    source = Source(manifest.name, tuple(manifest.shards(split)), epochs=1)
    task = isinstance(objective, TaskObjective)
    producer = DocProducer((source,), fresh_reader_state(1), seed=0, shuffle=False,
                           reader=rank, num_readers=world_size, io=io,
                           needs=objective.needs if task else ())
    packer = packer_for(producer, objective, micro_batch_size, manifest.eos_id)
    for count, window in enumerate(packer.windows()):
        if max_batches is not None and count >= max_batches:
            return
        yield window_batch(window, objective, 0)
