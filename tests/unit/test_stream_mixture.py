"""Mixtures realize their weights and resume exactly; whole-document packing never splits a
document that fits a row."""

from __future__ import annotations

from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from megatrain.data.manifest import Manifest
from megatrain.data.stream.mixture import MixtureEntry, Source, build_sources, choose, parse_mixture
from megatrain.data.stream.objectives import IGNORE
from megatrain.data.stream.train_stream import TrainStream, build_train_stream
from megatrain.errors import ConfigError
from tests.unit.stream_corpus import EOS, PAD, all_keys, make_corpus

A_BASE, B_BASE = 10, 1000


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Manifest]:
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("mix")
    a = make_corpus(root / "a", rng.integers(20, 80, 60).tolist(), prefix="a", base=A_BASE)
    b = make_corpus(root / "b", rng.integers(100, 400, 30).tolist(), prefix="b", base=B_BASE)
    return a, b


def mixed(two: tuple[Manifest, Manifest], weights: tuple[float, float] = (0.7, 0.3),
          epochs: tuple = (None, None), **kw) -> TrainStream:
    sources = [Source(name, tuple(m.shards("train")), w, e)
               for name, m, w, e in zip("ab", two, weights, epochs, strict=True)]
    args = {"seq_len": 64, "micro_batch_size": 8, "seed": 3, "rank": 0, "world_size": 1,
            "num_workers": 0} | kw
    return build_train_stream(two[0], sources=sources, **args)


def test_a_70_30_mixture_realizes_its_weights_over_2000_blocks(two) -> None:
    s = mixed(two, num_workers=2)
    from_a = total = 0
    for batch in islice(iter(s), 250):  # 250 × 8 rows = 2,000 blocks of 64 tokens
        inputs = batch["input_ids"]
        real = inputs != EOS
        from_a += int(((inputs < B_BASE) & real).sum())
        total += int(real.sum())
    assert abs(from_a / total - 0.7) <= 0.01, from_a / total
    metrics = s.metrics()
    assert metrics["tokens/a"] + metrics["tokens/b"] == 250 * 8 * 64
    assert abs(metrics["tokens/a"] / (250 * 8 * 64) - 0.7) <= 0.01


def test_a_mixture_resumes_exactly_and_keys_name_their_source(two) -> None:
    straight = list(islice(iter(mixed(two)), 12))
    first = mixed(two)
    list(islice(iter(first), 7))
    keys, _ = first.pop_trace()
    assert {k.split("/")[0] for k in keys} == {"a", "b"}
    resumed = mixed(two)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(straight[7:], islice(iter(resumed), 5), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_an_epochs_limit_reads_a_source_that_many_times(two) -> None:
    s = mixed(two, weights=(0.5, 0.5), epochs=(None, 1))
    seen: Counter = Counter()
    for _ in islice(iter(s), 400):
        keys, epochs = s.pop_trace()
        seen.update((k, e) for k, e in zip(keys, epochs, strict=True) if k.startswith("b/"))
    assert {k for k, _ in seen} == {f"b/{k}" for k in all_keys(two[1], "b")}
    assert set(seen.values()) == {1} and {e for _, e in seen} == {0}


def test_choose_follows_the_largest_deficit() -> None:
    assert choose([0, 0], [0.7, 0.3], [True, True]) == 0
    assert choose([70, 20], [0.7, 0.3], [True, True]) == 1
    assert choose([70, 20], [0.7, 0.3], [True, False]) == 0
    assert choose([1, 1], [0.5, 0.5], [False, False]) is None


def test_mixture_config_errors(two) -> None:
    with pytest.raises(ConfigError, match="weight must be > 0"):
        parse_mixture([{"path": "x", "weight": 0}])
    with pytest.raises(ConfigError, match="names must be unique"):
        parse_mixture([{"path": "d/x"}, {"path": "e/x"}])
    other = Manifest(**{**vars(two[1]), "tokenizer": {**two[1].tokenizer, "sha256": "other"}})
    entries = [MixtureEntry("a", "a", 1.0, None), MixtureEntry("b", "b", 1.0, None)]
    with pytest.raises(ConfigError, match="different tokenizers"):
        build_sources(entries, {"a": two[0], "b": other}.__getitem__)


def test_whole_document_rows_pad_instead_of_splitting(tmp_path: Path) -> None:
    lengths = [3, 9, 14, 5, 30, 2, 11, 7, 15, 4, 40, 6]
    corpus = make_corpus(tmp_path, lengths, shards=3)

    def stream() -> TrainStream:
        return build_train_stream(corpus, seq_len=16, micro_batch_size=3, seed=2, rank=0,
                                  world_size=1, num_workers=0, pack_whole_docs=True)

    s = stream()
    batches, seen = [], Counter()
    for batch in islice(iter(s), 12):
        batches.append(batch)
        keys, epochs = s.pop_trace()
        seen.update(k for k, e in zip(keys, epochs, strict=True) if e == 0)
    assert set(seen) == all_keys(corpus) and set(seen.values()) == {1}
    for batch in batches:
        inputs, labels = batch["input_ids"], batch["labels"]
        assert inputs.shape[1] == 16
        assert torch.equal(labels[:, :-1] == IGNORE, inputs[:, 1:] == PAD)  # -100 on padding
        for row, last in zip(inputs.tolist(), labels[:, -1].tolist(), strict=True):
            row.append(PAD if last == IGNORE else last)
            docs = Counter(t - 10 for t in row if t not in (EOS, PAD))
            for k, n in docs.items():  # whole in its row, unless longer than a row (17 tokens)
                assert n == lengths[k] or lengths[k] + 1 > 17, (row, k)
            if PAD in row:  # padding only at the end of a row
                assert set(row[row.index(PAD):]) == {PAD}
    straight = [b["input_ids"] for b in islice(iter(stream()), 8)]
    first = stream()
    list(islice(iter(first), 5))
    resumed = stream()
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b["input_ids"])
               for a, b in zip(straight[5:], islice(iter(resumed), 3), strict=True))
