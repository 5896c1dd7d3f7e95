"""Deterministic, resumable, packed stream of training batches over prepared shards.

Order. Epoch ``e`` permutes the shards with ``default_rng([seed, e])`` and the samples of shard
``i`` with ``default_rng([seed, e, i])``; concatenated, that is a global order of N samples that
depends on (seed, epoch) only. There are R = world_size × max(1, num_workers) readers; reader
``r = rank × W + worker`` reads the slice ``[r·N//R, (r+1)·N//R)`` of every epoch, in turn.

Packing. A reader concatenates its documents, each followed by EOS, into one token stream. A
micro-batch of B rows of T tokens is a window of ``B·T + overlap`` tokens, which the objective
(``megatrain.data.objectives``) turns into tensors: for causal LM, overlap 1 and row ``i`` is
``window[i·T : i·T + T + 1]`` split into inputs and labels shifted by one. The next window starts
``B·T`` tokens later, so every token of the stream is trained on exactly once. The objective's
random choices (masks, spans) come from a generator seeded by (seed, the window's start position),
so they too are the same after a resume.

State. A reader's position is ``{"epoch", "pos", "offset"}``: the document (index in its slice)
and token offset (EOS included) where the next window starts, so half-consumed documents survive
a checkpoint. The DataLoader hands batches out round-robin from workers 0..W-1; the stream counts
the batches consumed and, on resume, rotates which reader each worker plays so the round-robin
continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import signal
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatrain.data.manifest import Manifest, ShardInfo
from megatrain.data.objectives import CausalLM, Objective
from megatrain.errors import ConfigError, DataError

STATE_VERSION = 1
Doc = tuple[int, int, np.ndarray]
"""(epoch, position in the reader's slice, tokens followed by EOS)."""


# --- global order ---------------------------------------------------------------------------


def reader_slice(
    samples: Sequence[int], *, seed: int, epoch: int, shuffle: bool, reader: int, num_readers: int
) -> list[tuple[int, np.ndarray]]:
    """``(shard index, sample indices)`` segments of reader ``reader``'s slice of epoch ``epoch``.

    Only the shards that overlap the slice get their sample permutation drawn.
    """
    total = sum(samples)
    lo, hi = reader * total // num_readers, (reader + 1) * total // num_readers
    order = (
        np.random.default_rng([seed, epoch]).permutation(len(samples))
        if shuffle
        else range(len(samples))
    )
    segments, start = [], 0
    for shard in map(int, order):
        end = start + samples[shard]
        if end > lo and start < hi:
            idx = _sample_order(
                samples[shard], seed=seed, epoch=epoch, shard=shard, shuffle=shuffle
            )
            segments.append((shard, idx[max(lo - start, 0) : min(hi, end) - start]))
        start = end
        if start >= hi:
            break
    return segments


def _sample_order(n: int, *, seed: int, epoch: int, shard: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, shard]).permutation(n)


def load_shard(shard: ShardInfo) -> list[np.ndarray]:
    """All token arrays of a shard, in tar order; DataError naming the shard if it is unreadable."""
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(shard.path)]), wds.tarfile_to_samples())
    try:
        samples = [np.load(io.BytesIO(s["tokens.npy"]), allow_pickle=False) for s in pipeline]
    except (OSError, ValueError, KeyError, tarfile.TarError) as exc:
        raise DataError(f"shard {shard.path} is unreadable: {exc}") from exc
    if len(samples) != shard.samples:
        raise DataError(
            f"shard {shard.path} has {len(samples)} samples, the manifest says {shard.samples}"
        )
    for tokens in samples:
        if tokens.ndim != 1 or tokens.dtype.kind != "u":
            raise DataError(
                f"shard {shard.path} holds tokens of dtype {tokens.dtype}, shape {tokens.shape}"
            )
    return samples


class _ShardCache:
    """Keeps the one shard a reader is in: slices are contiguous, so each is opened once an epoch."""

    def __init__(self, shards: Sequence[ShardInfo]) -> None:
        self.shards = shards
        self._index: int | None = None
        self._samples: list[np.ndarray] = []

    def get(self, index: int) -> list[np.ndarray]:
        if index != self._index:
            self._samples, self._index = load_shard(self.shards[index]), index
        return self._samples


def iter_docs(
    shards: Sequence[ShardInfo],
    *,
    eos_id: int,
    seed: int,
    shuffle: bool,
    reader: int,
    num_readers: int,
    epoch: int = 0,
    pos: int = 0,
    epochs: int | None = None,
) -> Iterator[Doc]:
    """A reader's documents from ``(epoch, pos)`` on, epoch after epoch (``epochs`` of them if set)."""
    counts = [s.samples for s in shards]
    cache = _ShardCache(shards)
    last = None if epochs is None else epoch + epochs
    while last is None or epoch < last:
        segments = reader_slice(
            counts, seed=seed, epoch=epoch, shuffle=shuffle, reader=reader, num_readers=num_readers
        )
        if not segments and last is None:
            raise DataError(
                f"reader {reader} of {num_readers} has no samples (only {sum(counts)} in all)"
            )
        yield from _slice_docs(segments, cache, epoch, pos, eos_id)
        epoch, pos = epoch + 1, 0


def _slice_docs(
    segments: list[tuple[int, np.ndarray]], cache: _ShardCache, epoch: int, pos: int, eos_id: int
) -> Iterator[Doc]:
    start = 0
    for shard, indices in segments:
        if pos < start + len(indices):
            samples = cache.get(shard)
            for j in range(max(pos - start, 0), len(indices)):
                tokens = samples[indices[j]]
                yield epoch, start + j, np.concatenate([tokens, np.array([eos_id], tokens.dtype)])
        start += len(indices)


# --- packing --------------------------------------------------------------------------------


class Packer:
    """Cuts a document stream into windows of ``rows·seq_len + overlap`` tokens (see the module
    doc); ``seq_len`` is the stream tokens per row.

    ``state()`` after a window is the position where the next window starts. A finite document
    stream ends with one window of the complete rows that remain, if any.
    """

    def __init__(self, docs: Iterator[Doc], *, seq_len: int, rows: int, offset: int = 0,
                 overlap: int = 1) -> None:
        self.docs, self.seq_len, self.rows, self.overlap = docs, seq_len, rows, overlap
        self._buffer: deque[Doc] = deque()
        self._offset = offset
        self._available = -offset  # tokens buffered from the current position on

    def __iter__(self) -> Iterator[np.ndarray]:
        step = self.rows * self.seq_len
        while True:
            if not self._fill(step + self.overlap):
                rows = (self._available - self.overlap) // self.seq_len
                if rows > 0:
                    yield self._window(rows * self.seq_len + self.overlap)
                return
            window = self._window(step + self.overlap)
            self._advance(step)
            yield window

    def state(self) -> dict[str, int]:
        epoch, pos, _ = self._buffer[0]
        return {"epoch": int(epoch), "pos": int(pos), "offset": int(self._offset)}

    def _fill(self, need: int) -> bool:
        while self._available < need:
            doc = next(self.docs, None)
            if doc is None:
                return False
            self._buffer.append(doc)
            self._available += len(doc[2])
        return True

    def _window(self, size: int) -> np.ndarray:
        parts, have = [], -self._offset
        for _, _, tokens in self._buffer:
            parts.append(tokens)
            have += len(tokens)
            if have >= size:
                break
        return np.concatenate(parts)[self._offset : self._offset + size].astype(np.int64)

    def _advance(self, step: int) -> None:
        self._offset += step
        self._available -= step
        while self._offset >= len(self._buffer[0][2]):
            self._offset -= len(self._buffer[0][2])
            self._buffer.popleft()


def objective_batches(packer: Packer, objective: Objective, seed: int,
                      start: dict[str, int]) -> Iterator[tuple[dict[str, torch.Tensor], dict]]:
    """(batch, state after it) per window; each window's random draws are seeded by where it
    starts in the global order, which no resume or world size changes."""
    for window in packer:
        rows = (len(window) - objective.overlap) // objective.row_tokens
        rng = np.random.default_rng([seed, start["epoch"], start["pos"], start["offset"]])
        start = packer.state()
        yield objective.batch(window, rows, rng), start


# --- the training stream --------------------------------------------------------------------


@dataclass(frozen=True)
class StreamConfig:
    """Everything that determines a rank's batches; saved with the state and checked on load."""

    shards: tuple[ShardInfo, ...]
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

    @property
    def readers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def num_readers(self) -> int:
        return self.world_size * self.readers_per_rank

    def identity(self) -> dict[str, Any]:
        """The fields a saved state must agree on to resume exactly."""
        keys = (
            "corpus",
            "split",
            "seq_len",
            "seed",
            "rank",
            "world_size",
            "num_workers",
            "shuffle",
        )
        return {**{k: getattr(self, k) for k in keys}, "objective": self.objective.name}


class PackedDataset(IterableDataset):
    """One reader per DataLoader worker; yields ``(batch, local reader index, state after it)``."""

    def __init__(self, config: StreamConfig, states: list[dict[str, int]], rotation: int) -> None:
        super().__init__()
        self.config, self.states, self.rotation = config, states, rotation

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], int, dict[str, int]]]:
        cfg = self.config
        info = get_worker_info()
        local = ((info.id if info else 0) + self.rotation) % cfg.readers_per_rank
        state = self.states[local]
        docs = iter_docs(
            cfg.shards,
            eos_id=cfg.eos_id,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
            reader=cfg.rank * cfg.readers_per_rank + local,
            num_readers=cfg.num_readers,
            epoch=state["epoch"],
            pos=state["pos"],
        )
        packer = Packer(docs, seq_len=cfg.objective.row_tokens, rows=cfg.micro_batch_size,
                        offset=state["offset"], overlap=cfg.objective.overlap)
        for batch, after in objective_batches(packer, cfg.objective, cfg.seed, state):
            yield batch, local, after


def _ignore_stop_signals(worker_id: int) -> None:
    """A scheduler's SIGTERM / SIGUSR1 reaches the whole process group: the trainer handles it
    and saves; its loader workers must keep serving until then."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class TrainStream:
    """This rank's infinite stream of micro-batches (the objective's dict of LongTensors (B, ...)).

    ``state_dict()`` is the position after the last batch handed out; a fresh stream given it by
    ``load_state_dict()`` continues with exactly the batches an uninterrupted one would yield.
    """

    def __init__(self, config: StreamConfig, *, pin_memory: bool = False) -> None:
        self.config = config
        self.pin_memory = pin_memory
        self._states = [{"epoch": 0, "pos": 0, "offset": 0} for _ in range(config.readers_per_rank)]
        self._consumed = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.config
        rotation = self._consumed % cfg.readers_per_rank
        dataset = PackedDataset(cfg, [dict(s) for s in self._states], rotation)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=cfg.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals,
        )
        for batch, local, state in loader:
            self._states[local] = state
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Small, picklable and JSON-able: the config identity, batches consumed, reader positions."""
        return {
            "version": STATE_VERSION,
            **self.config.identity(),
            "consumed": self._consumed,
            "readers": [dict(s) for s in self._states],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state``; DataError naming each setting that differs from this stream's."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"unsupported data stream state version {state.get('version')!r}")
        diffs = [
            f"{k}: saved {state.get(k)!r}, now {v!r}"
            for k, v in self.config.identity().items()
            if state.get(k) != v
        ]
        if diffs:
            raise DataError(
                "cannot resume the data stream exactly; it was saved with different settings ("
                + "; ".join(diffs)
                + "). Resuming on another world size or worker count is not supported yet."
            )
        self._consumed = int(state["consumed"])
        self._states = [
            {"epoch": int(s["epoch"]), "pos": int(s["pos"]), "offset": int(s["offset"])}
            for s in state["readers"]
        ]


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
) -> TrainStream:
    """The training stream of ``rank`` over ``manifest``'s ``split`` shards; ``objective``
    defaults to causal LM over ``seq_len``."""
    _check_stream_args(seq_len, micro_batch_size, seed, rank, world_size, num_workers)
    shards = tuple(manifest.shards(split))
    config = StreamConfig(
        shards=shards,
        corpus=corpus_fingerprint(shards),
        split=split,
        eos_id=manifest.eos_id,
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        shuffle=shuffle,
        objective=objective or CausalLM(seq_len, manifest.eos_id),
    )
    total = sum(s.samples for s in shards)
    if total < config.num_readers:
        raise DataError(
            f"split {split!r} of {manifest.root} has {total} samples, fewer than its "
            f"{config.num_readers} readers (world_size × num_workers); use fewer data workers"
        )
    return TrainStream(config, pin_memory=pin_memory)


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


def corpus_fingerprint(shards: Sequence[ShardInfo]) -> str:
    """A short hash of the shard list: a saved position only means something on the same shards."""
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(f"{shard.name}:{shard.sha256}\n".encode())
    return digest.hexdigest()[:16]


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
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of ``split`` in natural order, packed, one pass, in-process.

    Ends after ``max_batches`` or at the end of the data; the last batch may have fewer rows and
    ranks may get different numbers of batches (reduce sums once at the end, not per batch).
    """
    _check_stream_args(seq_len, micro_batch_size, 0, rank, world_size, 0)
    docs = iter_docs(
        manifest.shards(split),
        eos_id=manifest.eos_id,
        seed=0,
        shuffle=False,
        reader=rank,
        num_readers=world_size,
        epochs=1,
    )
    objective = objective or CausalLM(seq_len, manifest.eos_id)
    packer = Packer(docs, seq_len=objective.row_tokens, rows=micro_batch_size,
                    overlap=objective.overlap)
    start = {"epoch": 0, "pos": 0, "offset": 0}
    for count, (batch, _) in enumerate(objective_batches(packer, objective, 0, start)):
        if max_batches is not None and count >= max_batches:
            return
        yield batch
