"""Fault isolation: bad samples and shards are skipped and counted, a budget stops the run with
the shards named, remote shards are retried, a missing shard is named at start."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megatrain.data import storage
from megatrain.data.manifest import Manifest
from megatrain.data.stream.shard_reader import ShardIO, parse_shard, read_shard
from megatrain.data.stream.train_stream import build_train_stream
from megatrain.errors import DataError
from tests.unit.stream_corpus import all_keys, doc_tokens, make_corpus, npy, write_tar

LENGTHS = [5 + (7 * k) % 23 for k in range(40)]  # 4 shards of 10 documents


def corrupt(manifest: Manifest) -> dict[str, int]:
    """Truncate shard 0 mid-way, spoil a member of shard 1, empty shard 2: {shard: lost docs}."""
    shards = manifest.shards("train")
    data = shards[0].path.read_bytes()
    shards[0].path.write_bytes(data[: len(data) // 2])
    data = bytearray(shards[1].path.read_bytes())
    at = data.index(b"\x93NUMPY", data.index(b"\x93NUMPY") + 1)  # the second sample's tokens
    data[at : at + 6] = b"garbag"
    shards[1].path.write_bytes(bytes(data))
    shards[2].path.write_bytes(b"")
    lost = {s.name: read_shard(s).bad for s in shards[:3]}
    assert lost[shards[1].name] == 1 and lost[shards[2].name] == 10 and lost[shards[0].name] > 1
    return lost


def test_parse_isolates_each_fault(tmp_path: Path) -> None:
    good = [(f"k{i}", npy(doc_tokens(i, 4))) for i in range(4)]
    bad_dtype = npy(np.zeros(4, np.float32))
    write_tar(tmp_path / "a.tar", [good[0], ("k9", bad_dtype), *good[1:]])
    read = parse_shard((tmp_path / "a.tar").read_bytes(), 5, "a.tar")
    assert [t is None for t in read.tokens] == [False, True, False, False, False]
    assert read.keys == ["k0", "k9", "k1", "k2", "k3"] and "float32" in read.errors[0]
    assert read.tokens[2].tolist() == [11] * 4
    data = (tmp_path / "a.tar").read_bytes()
    cut = parse_shard(data[:3000], 5, "a.tar")  # 2 members of 1 KiB each per sample
    assert [t is None for t in cut.tokens] == [False, True, True, True, True]
    assert "truncated" in cut.errors[0]
    assert parse_shard(b"", 3, "e.tar").errors == ["e.tar: empty file"]


@pytest.mark.parametrize("name", ["../x", "/abs/x", "a/../../x"])
def test_a_member_that_would_leave_the_folder_stops_the_shard(tmp_path: Path, name: str) -> None:
    good = [(f"k{i}", npy(doc_tokens(i, 4))) for i in range(3)]
    write_tar(tmp_path / "a.tar", [good[0], (name, npy(doc_tokens(7, 4))), *good[1:]])
    read = parse_shard((tmp_path / "a.tar").read_bytes(), 4, "a.tar")
    assert [t is None for t in read.tokens] == [False, True, True, True]
    assert f"member '{name}.json' at byte" in read.errors[0] and "unsafe name" in read.errors[0]


def test_a_stream_over_corrupt_shards_skips_counts_and_reads_the_rest_once(
        tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path, LENGTHS, shards=4)
    lost = corrupt(corpus)
    s = build_train_stream(corpus, seq_len=8, micro_batch_size=2, seed=1, rank=0, world_size=1,
                           num_workers=2, max_skip_fraction=0.5)
    seen: Counter = Counter()
    it = iter(s)
    for _ in range(60):  # ~2 epochs of the 280 tokens that remain
        next(it)
        keys, epochs = s.pop_trace()
        seen.update(k for k, e in zip(keys, epochs, strict=True) if e == 0)
    it.close()
    state = s.state_dict()
    assert s.metrics()["data_skipped"] >= sum(lost.values())  # epoch 0, and some of epoch 1
    assert state["skipped"]["0"] == sum(lost.values())
    assert set(state["bad_shards"]) == set(lost)
    assert all(n == 1 for n in seen.values())
    assert len(seen) == len(all_keys(corpus)) - sum(lost.values())


def test_past_the_budget_the_stream_stops_naming_the_shards(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path, LENGTHS, shards=4)
    lost = corrupt(corpus)
    s = build_train_stream(corpus, seq_len=8, micro_batch_size=2, seed=1, rank=0, world_size=1,
                           num_workers=0, max_skip_fraction=0.1)
    with pytest.raises(DataError, match="max_skip_fraction=0.1") as err:
        for _ in zip(range(60), s, strict=False):
            pass
    assert all(name in str(err.value) for name in lost)


def _flaky_pipe(tmp_path: Path, target: Path, failures: int) -> str:
    """A ``pipe:`` URL whose command fails ``failures`` times, then prints ``target``."""
    script = tmp_path / "flaky.py"
    counter = tmp_path / "count"
    script.write_text(
        "import pathlib, sys\n"
        f"c = pathlib.Path({str(counter)!r})\n"
        "n = int(c.read_text()) if c.exists() else 0\n"
        "c.write_text(str(n + 1))\n"
        f"sys.exit(1) if n < {failures} else "
        f"sys.stdout.buffer.write(pathlib.Path({str(target)!r}).read_bytes())\n")
    return f"pipe:{sys.executable} {script}"


def test_remote_shards_are_retried_with_backoff(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "c", LENGTHS, shards=1)
    shard = corpus.shards("train")[0]
    waits: list[float] = []
    url = _flaky_pipe(tmp_path, shard.path, failures=2)
    got = storage.with_retries(url, lambda: storage.read_bytes(url, limit=1 << 20, retries=0),
                               retries=3, backoff_s=0.5, sleep=waits.append)
    assert got == shard.path.read_bytes()
    assert waits == [0.5, 1.0]
    os.remove(tmp_path / "count")
    with pytest.raises(OSError, match="failed after 2 attempts"):
        storage.read_bytes(_flaky_pipe(tmp_path, shard.path, failures=5), limit=1 << 20,
                           retries=1, backoff_s=0.0)
    os.remove(tmp_path / "count")
    flaky = dataclasses.replace(shard, url=_flaky_pipe(tmp_path, shard.path, failures=9))
    read = read_shard(flaky, ShardIO(retries=0))
    assert read.bad == shard.samples and "failed after 1 attempts" in read.errors[0]


def test_a_missing_shard_is_named_at_start(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path, LENGTHS, shards=4)
    corpus.shards("train")[3].path.unlink()
    with pytest.raises(DataError, match="missing: train-000003.tar"):
        Manifest.load(tmp_path).check_files()


@pytest.mark.parametrize("budget", [0.01, 1.0])
def test_a_reader_with_nothing_readable_stops_instead_of_spinning(tmp_path: Path,
                                                                  budget: float) -> None:
    """No batch ever reaches the rank's count: the reader itself stops, past the budget or
    after an epoch with nothing readable (a budget of everything)."""
    corpus = make_corpus(tmp_path, LENGTHS, shards=4)
    for shard in corpus.shards("train"):
        shard.path.write_bytes(b"")
    s = build_train_stream(corpus, seq_len=16, micro_batch_size=2, seed=0, rank=0,
                           world_size=1, num_workers=0, max_skip_fraction=budget)
    what = "max_skip_fraction=0.01" if budget < 1 else "nothing readable in its share of epoch 0"
    with pytest.raises(DataError, match=f"{what}.*bad shards: train-00000.\\.tar \\(train-"):
        next(iter(s))
