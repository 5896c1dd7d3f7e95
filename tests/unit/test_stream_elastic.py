"""Elastic exactly-once: ranks simulated in-process (each with real DataLoader workers), stopped
at any step and resumed on any other world size and worker count; every document of the epoch
is consumed exactly once."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from megatrain.data.manifest import Manifest
from megatrain.data.stream.elastic import merge_source, split_pieces
from megatrain.data.stream.train_stream import TrainStream, build_train_stream
from megatrain.errors import DataError
from tests.unit.stream_corpus import EOS, all_keys, make_corpus

LENGTHS = [int(n) for n in np.random.default_rng(0).integers(1, 60, 41)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return make_corpus(tmp_path_factory.mktemp("elastic"), LENGTHS, shards=5)


def streams(manifest: Manifest, world: int, workers: int, rows: int, seq: int) -> list[TrainStream]:
    return [build_train_stream(manifest, seq_len=seq, micro_batch_size=rows, seed=5, rank=r,
                               world_size=world, num_workers=workers) for r in range(world)]


def epoch0_done(stream: TrainStream) -> bool:
    return all(src["next"] >= 1 and all(p[0] >= 1 for p in src["todo"])
               for reader in stream.state_dict()["readers"] for src in reader["sources"])


def run_lockstep(ranks: list[TrainStream], steps: int | None, seen: Counter) -> None:
    """Each rank takes one batch per step (``steps`` of them, or until every reader has finished
    epoch 0); consumed keys of epoch 0 go to ``seen``, later epochs are checked for repeats."""
    iters = [iter(s) for s in ranks]
    later: Counter = Counter()
    step = 0
    while (steps is None and not all(map(epoch0_done, ranks))) or (steps is not None
                                                                   and step < steps):
        for s, it in zip(ranks, iters, strict=True):
            batch = next(it)
            assert batch["input_ids"].dtype == torch.long
            keys, epochs = s.pop_trace()
            for key, epoch in zip(keys, epochs, strict=True):
                if epoch == 0:
                    seen[key] += 1
                else:
                    later[key, epoch] += 1
        step += 1
        assert step < 5000, "the epoch never ended"
    for it in iters:
        it.close()
    assert all(n == 1 for n in later.values()), later.most_common(3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(world=st.integers(1, 4), workers=st.integers(0, 2), world2=st.integers(1, 4),
       workers2=st.integers(0, 2), rows=st.integers(1, 3), seq=st.integers(3, 24),
       stop=st.integers(0, 40))
def test_every_document_once_across_a_resume_on_another_layout(
        corpus: Manifest, world: int, workers: int, world2: int, workers2: int, rows: int,
        seq: int, stop: int) -> None:
    assume((world2, workers2) != (world, workers))  # another world size or worker count
    seen: Counter = Counter()
    first = streams(corpus, world, workers, rows, seq)
    run_lockstep(first, stop, seen)
    states = [s.state_dict() for s in first]
    second = streams(corpus, world2, workers2, rows, seq)
    for s in second:
        s.load_state_dict(list(reversed(states)))  # any order
    run_lockstep(second, None, seen)
    assert set(seen) == all_keys(corpus)
    assert all(n == 1 for n in seen.values()), seen.most_common(3)


def tokens_of(batches: list[dict]) -> list[int]:
    return [int(batches[0]["input_ids"][0, 0])] + torch.cat(
        [b["labels"].flatten() for b in batches]).tolist()


def test_a_resharded_half_read_document_continues_at_its_offset(corpus: Manifest) -> None:
    """Every token of every document is read once (CLM labels) across 2 ranks → 3 ranks."""
    first = streams(corpus, 2, 0, 2, 7)
    consumed = []
    for s in first:
        it = iter(s)
        consumed.append(tokens_of([next(it) for _ in range(3)]))
        it.close()
    assert any(r["sources"][0]["todo"][0][3] > 0 for s in first
               for r in s.state_dict()["readers"])  # a half-read document
    second = streams(corpus, 3, 0, 2, 7)
    for s in second:
        s.load_state_dict([f.state_dict() for f in first])
        it = iter(s)
        batches = []
        while not epoch0_done(s):
            batches.append(next(it))
        it.close()
        consumed.append(tokens_of(batches))
    counts = Counter()
    for tokens in consumed:  # each run's first input, then its labels
        counts.update(t for t in tokens if t != EOS)
    expected = Counter({10 + k: n for k, n in enumerate(LENGTHS)})
    assert all(counts[t] >= n for t, n in expected.items())  # nothing dropped ...
    assert sum(counts.values()) - sum(expected.values()) < 5 * 7 * 2  # ... only later epochs' tail


def test_split_pieces_and_merge_keep_every_index_once() -> None:
    pieces = [(0, 5, 2), (9, 12, 0)]  # 8 indices; index 0 is 2 tokens in
    assert split_pieces(pieces, 3) == [[(0, 2, 2)], [(2, 5, 0)], [(9, 12, 0)]]
    assert split_pieces(pieces, 2) == [[(0, 4, 2)], [(4, 5, 0), (9, 12, 0)]]
    tenths = split_pieces(pieces, 10)
    assert sorted(len(p) for p in tenths) == [0, 0] + [1] * 8
    assert [a for p in tenths for a, _, _ in p] == [0, 1, 2, 3, 4, 9, 10, 11]
    old = [{"todo": [[0, 3, 5, 4]], "next": 1},  # reader 0 of 2: half-way through epoch 0
           {"todo": [[1, 5, 10, 0]], "next": 2}]  # reader 1: done with epoch 0, into epoch 1
    new = merge_source(old, samples=10, new_readers=2, epochs=None)
    assert new == [{"todo": [[0, 3, 4, 4], [1, 0, 5, 0]], "next": 2},  # epoch 1: reader 0's
                   {"todo": [[0, 4, 5, 0], [1, 5, 10, 0]], "next": 2}]  # whole share is left
    assert merge_source(old, samples=10, new_readers=1, epochs=1) == [
        {"todo": [[0, 3, 5, 4]], "next": 2}]


def test_resuming_on_another_layout_needs_every_rank(corpus: Manifest) -> None:
    first = streams(corpus, 2, 0, 2, 8)
    it = iter(first[1])
    next(it)
    it.close()
    other = streams(corpus, 1, 0, 2, 8)[0]
    assert other.needs_every_rank(first[1].state_dict())
    with pytest.raises(DataError, match="needs the saved state of every rank"):
        other.load_state_dict(first[1].state_dict())
    with pytest.raises(DataError, match=r"seq_len: saved 8, now 9"):
        streams(corpus, 2, 0, 2, 9)[0].load_state_dict([s.state_dict() for s in first])
