"""``data.shuffle_rows``: a micro-batch's rows from far-apart places, every row of an epoch still
once, exact resume inside a block, and a block read again (never lost) on another layout."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch

from megatrain.data.manifest import Manifest
from megatrain.data.stream.packing import Packer, Window
from megatrain.data.stream.row_shuffle import SKIP, RowShuffler, block_start, shuffle_block
from megatrain.data.stream.tasks import Seq2Seq
from megatrain.data.stream.train_stream import TrainStream, build_train_stream, make_packer
from megatrain.errors import ConfigError
from tests.unit.stream_corpus import EOS, PAD, make_corpus
from tests.unit.test_stream_elastic import run_lockstep
from tests.unit.test_stream_faults import LENGTHS as FAULT_LENGTHS
from tests.unit.test_stream_faults import corrupt

SEQ, ROWS, BLOCK = 8, 3, 4
LENGTHS = [int(n) for n in np.random.default_rng(3).integers(5, 200, 60)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return make_corpus(tmp_path_factory.mktemp("rowshuffle"), LENGTHS, shards=3, vocab=16384,
                       distinct=True)


def stream(manifest: Manifest, shuffle_rows: int, **overrides) -> TrainStream:
    args = {"seq_len": SEQ, "micro_batch_size": ROWS, "seed": 11, "rank": 0, "world_size": 1,
            "num_workers": 0, "shuffle_rows": shuffle_rows}
    return build_train_stream(manifest, **(args | overrides))


def take(s: TrainStream, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(s)
    batches = [next(it) for _ in range(n)]
    it.close()
    return batches


def rows_of(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """Each row as one tuple: its inputs and labels (the corpus's ids are distinct, so a row
    names its place in the corpus)."""
    return [tuple(x.tolist() + y.tolist())
            for x, y in zip(batch["input_ids"], batch["labels"], strict=True)]


def epoch(s: TrainStream) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    batches = list(s)
    return batches, s.pop_trace()[0]


@pytest.mark.parametrize("whole_docs", [False, True])
def test_an_epoch_has_the_same_rows_once_but_a_batch_no_longer_adjacent_ones(
        corpus: Manifest, whole_docs: bool) -> None:
    plain, plain_keys = epoch(stream(corpus, 1, epochs=1, pack_whole_docs=whole_docs))
    mixed, mixed_keys = epoch(stream(corpus, BLOCK, epochs=1, pack_whole_docs=whole_docs))
    assert len(mixed) == len(plain) > 10 * BLOCK
    assert [len(b["input_ids"]) for b in mixed] == [len(b["input_ids"]) for b in plain]
    assert sorted(mixed_keys) == sorted(plain_keys) and len(set(plain_keys)) == len(plain_keys)
    place = {row: i for i, row in enumerate(r for b in plain for r in rows_of(b))}
    assert len(place) == sum(len(b["input_ids"]) for b in plain)  # every row distinct
    for j in range(0, len(plain), BLOCK):  # rows move only within their block ...
        block = slice(j, j + BLOCK)
        assert Counter(r for b in mixed[block] for r in rows_of(b)) == Counter(
            r for b in plain[block] for r in rows_of(b))
    adjacent = [np.all(np.diff([place[r] for r in rows_of(b)]) == 1) for b in mixed]
    assert sum(adjacent) < len(mixed) / 4  # ... and a batch's rows are no longer neighbours
    assert not torch.equal(mixed[0]["input_ids"], plain[0]["input_ids"])


@pytest.mark.parametrize("num_workers,consumed", [(0, 6), (2, 7), (0, 8), (2, 13)])
def test_resume_inside_a_block_continues_exactly(corpus: Manifest, num_workers: int,
                                                 consumed: int) -> None:
    uninterrupted = take(stream(corpus, BLOCK, num_workers=num_workers), consumed + 6)
    first = stream(corpus, BLOCK, num_workers=num_workers)
    take(first, consumed)
    state = first.state_dict()
    skips = [r.get(SKIP, 0) for r in state["readers"]]
    per_reader = [len(range(r, consumed, max(1, num_workers))) for r in range(len(skips))]
    assert skips == [n % BLOCK for n in per_reader]  # mid-block readers say so
    resumed = stream(corpus, BLOCK, num_workers=num_workers)
    resumed.load_state_dict(state)
    for expected, got in zip(uninterrupted[consumed:], take(resumed, 6), strict=True):
        assert torch.equal(expected["input_ids"], got["input_ids"])
        assert torch.equal(expected["labels"], got["labels"])


def test_another_layout_inside_a_block_reads_the_block_again(
        corpus: Manifest, caplog: pytest.LogCaptureFixture) -> None:
    done = 2  # windows of the second block emitted before the stop
    first = stream(corpus, BLOCK)
    it = iter(first)
    seen: Counter = Counter()
    recent: list[list[str]] = []
    for _ in range(BLOCK + done):
        next(it)
        keys, _ = first.pop_trace()
        seen.update(keys)
        recent.append(keys)
    it.close()
    state = first.state_dict()
    assert state["readers"][0][SKIP] == done
    second = [stream(corpus, BLOCK, rank=r, world_size=2) for r in range(2)]
    with caplog.at_level(logging.WARNING, logger="megatrain"):
        for s in second:
            s.load_state_dict([state])
    assert "read the block again from its start" in caplog.text
    run_lockstep(second, None, seen)
    assert set(seen) == {f"d-{k}" for k in range(len(LENGTHS))}  # every document read
    repeated = Counter({k: n - 1 for k, n in seen.items() if n > 1})
    assert repeated == Counter(k for keys in recent[-done:] for k in keys)  # those windows' only
    assert sum(repeated.values()) > 0


def test_one_is_the_plain_packer(corpus: Manifest) -> None:
    cfg = stream(corpus, 1).config
    packer = make_packer(cfg, take_state(corpus), 0, 1)
    assert type(packer) is Packer
    assert isinstance(make_packer(stream(corpus, 2).config, take_state(corpus), 0, 1),
                      RowShuffler)
    for batch in take(stream(corpus, 1), 5):  # rows adjacent: each continues the one before
        assert torch.equal(batch["input_ids"][1:, 0], batch["labels"][:-1, -1])


def take_state(corpus: Manifest) -> dict:
    return stream(corpus, 1).state_dict()["readers"][0]


def test_flat_windows_without_overlap_stay_flat() -> None:
    block = [Window(np.arange(6) + 6 * j, 2, (0, 0, j, 0), [], [6]) for j in range(3)]
    out = shuffle_block(block, seed=1, row_tokens=3)
    assert all(w.real is None and w.tokens.shape == (6,) for w in out)
    assert [w.start for w in out] == [w.start for w in block]
    rows = sorted(tuple(r) for w in out for r in w.tokens.reshape(2, 3))
    assert rows == [tuple(range(3 * i, 3 * i + 3)) for i in range(6)]
    assert rows != [tuple(r) for w in out for r in w.tokens.reshape(2, 3)]  # not in order


def test_shuffle_rows_refuses_task_objectives_and_zero(corpus: Manifest) -> None:
    with pytest.raises(ConfigError, match="data.shuffle_rows must be >= 1"):
        stream(corpus, 0)
    with pytest.raises(ConfigError, match="whole samples already"):
        stream(corpus, 2, objective=Seq2Seq(SEQ, 4, EOS, PAD))


def test_a_resumed_block_does_not_count_its_unreadable_samples_twice(tmp_path) -> None:
    corpus = make_corpus(tmp_path, FAULT_LENGTHS, shards=4)
    corrupt(corpus)
    settings = {"seq_len": 8, "micro_batch_size": 2, "max_skip_fraction": 0.6}
    whole = stream(corpus, BLOCK, **settings)
    take(whole, 34)
    for consumed in (13, 22, 30):  # inside blocks that met unreadable samples
        first = stream(corpus, BLOCK, **settings)
        take(first, consumed)
        resumed = stream(corpus, BLOCK, **settings)
        resumed.load_state_dict(first.state_dict())
        take(resumed, 34 - consumed)
        assert resumed.state_dict()["skipped"] == whole.state_dict()["skipped"], consumed
    assert whole.metrics()["data_skipped"] > 0


@pytest.mark.parametrize("new_block", [1, 3])
def test_another_block_size_reads_the_block_again_from_its_start(
        corpus: Manifest, caplog: pytest.LogCaptureFixture, new_block: int) -> None:
    first = stream(corpus, BLOCK)
    take(first, BLOCK + 2)
    state = first.state_dict()
    expected = stream(corpus, new_block)
    expected.load_state_dict(state | {"readers": [block_start(state["readers"][0])]})
    resumed = stream(corpus, new_block)
    with caplog.at_level(logging.WARNING, logger="megatrain"):
        resumed.load_state_dict(state)
    assert "another data.shuffle_rows cannot continue" in caplog.text
    got = take(resumed, 3)
    for want, batch in zip(take(expected, 3), got, strict=True):
        assert torch.equal(want["input_ids"], batch["input_ids"])
    if new_block == 1:
        unshuffled = take(stream(corpus, 1), BLOCK + 1)[BLOCK]  # the block's first, in place
        assert torch.equal(got[0]["input_ids"], unshuffled["input_ids"])


def test_more_epochs_inside_the_last_partial_block_lose_no_row(
        corpus: Manifest, caplog: pytest.LogCaptureFixture) -> None:
    block = 5  # the epoch's 244 batches end with a partial block of 4
    one_epoch = list(stream(corpus, block, epochs=1))
    assert len(one_epoch) % block > 2
    consumed = len(one_epoch) - 2  # inside the last block
    first = stream(corpus, block, epochs=1)
    before = take(first, consumed)
    state = first.state_dict()
    assert state["readers"][0][SKIP] > 0
    resumed = stream(corpus, block, epochs=2)  # the data now runs on past the old block's end
    with caplog.at_level(logging.WARNING, logger="megatrain"):
        resumed.load_state_dict(state)
        after = list(resumed)
    assert "reads the block again from its start" in caplog.text
    seen = Counter(r for b in before + after for r in rows_of(b))
    two_epochs = Counter(r for b in stream(corpus, 1, epochs=2) for r in rows_of(b))
    assert not two_epochs - seen  # no row lost
    repeated = seen - two_epochs
    last_block = len(one_epoch) - len(one_epoch) % block
    assert repeated == Counter(r for b in before[last_block:] for r in rows_of(b))
