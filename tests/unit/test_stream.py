"""The packed stream: exactly-once coverage, exact resume, seeded order, shifted labels, errors."""

from __future__ import annotations

import io
import itertools
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import webdataset as wds

from megatrain.data.manifest import Manifest
from megatrain.data.stream.mixture import Source
from megatrain.data.stream.order import DocProducer, EpochOrder, fresh_reader_state
from megatrain.data.stream.packing import Packer
from megatrain.data.stream.train_stream import TrainStream, build_train_stream, iter_eval_batches
from megatrain.errors import DataError
from tests.unit.stream_corpus import EOS, make_corpus

SEQ, ROWS = 32, 4


def corpus_docs(manifest: Manifest, split: str) -> Counter:
    """Multiset of the split's documents as token tuples, read straight from the tars."""
    docs = Counter()
    for shard in manifest.splits[split]:
        for s in wds.DataPipeline(wds.SimpleShardList([str(shard.path)]), wds.tarfile_to_samples()):
            docs[tuple(np.load(io.BytesIO(s["tokens.npy"])).tolist())] += 1
    return docs


def stream(manifest: Manifest, **overrides) -> TrainStream:
    args = {"seq_len": SEQ, "micro_batch_size": ROWS, "seed": 7, "rank": 0, "world_size": 1}
    return build_train_stream(manifest, **(args | {"num_workers": 0} | overrides))


def take(s: TrainStream, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(s)
    batches = [next(it) for _ in range(n)]
    it.close()  # shuts down the DataLoader workers
    return batches


def split_docs(tokens: list[int], eos: int, count: int) -> list[tuple[int, ...]]:
    """The first ``count`` EOS-terminated documents of a reader's token stream."""
    ends = [i for i, t in enumerate(tokens) if t == eos][:count]
    assert len(ends) == count
    return [tuple(tokens[a + 1 : b]) for a, b in zip([-1] + ends, ends)]


def reader_streams(s: TrainStream, readers: int, enough: int) -> Iterator[list[list[int]]]:
    """Per-reader token streams: batch j comes from worker j % readers (round-robin)."""
    streams: list[list[int]] = [[] for _ in range(readers)]
    for j, batch in enumerate(s):
        tokens = streams[j % readers]
        if not tokens:
            tokens.append(int(batch["input_ids"][0, 0]))
        tokens.extend(batch["labels"].flatten().tolist())
        if j % readers == readers - 1 and min(map(len, streams)) >= enough:
            return streams
    raise AssertionError("unreachable: the stream is infinite")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_epoch_over_all_ranks_and_workers_is_the_corpus_exactly_once(
    prepared: Manifest, num_workers: int
) -> None:
    world, per_rank = 2, max(1, num_workers)
    readers = world * per_rank
    total = sum(s.samples for s in prepared.shards("train"))
    enough = prepared.stats["train_tokens"] // readers * 4 + 20_000  # > two of any reader's slices
    epochs = [Counter(), Counter()]
    for rank in range(world):
        s = stream(
            prepared, rank=rank, world_size=world, num_workers=num_workers, micro_batch_size=64
        )
        for local, tokens in enumerate(reader_streams(s, per_rank, enough)):
            r = rank * per_rank + local
            count = (r + 1) * total // readers - r * total // readers
            docs = split_docs(tokens, prepared.eos_id, 2 * count)
            epochs[0].update(docs[:count])
            epochs[1].update(docs[count:])
    corpus = corpus_docs(prepared, "train")
    assert epochs[0] == corpus and epochs[1] == corpus


@pytest.mark.parametrize(
    "num_workers,consumed,rows", [(0, 3, ROWS), (2, 3, ROWS), (0, 60, 64), (2, 61, 64)]
)
def test_resume_continues_exactly(
    prepared: Manifest, num_workers: int, consumed: int, rows: int
) -> None:
    """The 60-batch cases (2048 tokens each) resume after every reader crossed into epoch 1."""
    settings = {"num_workers": num_workers, "world_size": 2, "rank": 1, "micro_batch_size": rows}
    uninterrupted = take(stream(prepared, **settings), consumed + 6)
    first = stream(prepared, **settings)
    take(first, consumed)
    state = first.state_dict()
    assert state["consumed"] == consumed and len(state["readers"]) == max(1, num_workers)
    pieces = [r["sources"][0]["todo"][0] for r in state["readers"]]  # [epoch, g, end, offset]
    assert all(p[3] > 0 for p in pieces)  # mid-document positions
    if consumed >= 60:
        assert min(p[0] for p in pieces) == 1
    resumed = stream(prepared, **settings)
    resumed.load_state_dict(state)
    for expected, got in zip(uninterrupted[consumed:], take(resumed, 6), strict=True):
        assert torch.equal(expected["input_ids"], got["input_ids"])
        assert torch.equal(expected["labels"], got["labels"])


def test_seed_determines_the_order(prepared: Manifest) -> None:
    def inputs(seed: int) -> torch.Tensor:
        return torch.cat([b["input_ids"] for b in take(stream(prepared, seed=seed), 4)])

    assert torch.equal(inputs(3), inputs(3))
    assert not torch.equal(inputs(3), inputs(4))


def test_every_epoch_has_its_own_permutation(prepared: Manifest) -> None:
    counts = [s.samples for s in prepared.shards("train")]

    def order(epoch: int) -> np.ndarray:
        o = EpochOrder(counts, seed=3, source=0, epoch=epoch, shuffle=True)
        return np.array([shard * 1000 + i for shard, i in map(o.locate, range(sum(counts)))])

    assert sorted(order(0)) == sorted(order(1)) and len(order(0)) == sum(counts)
    assert not np.array_equal(order(0), order(1))
    assert np.array_equal(order(0), order(0))


def test_unshuffled_stream_starts_with_the_first_document(prepared: Manifest) -> None:
    (batch,) = take(stream(prepared, shuffle=False), 1)
    first_doc = next(iter(corpus_docs(Manifest.load(prepared.root), "train")))  # tar order
    n = min(len(first_doc), SEQ)
    assert batch["input_ids"][0, :n].tolist() == list(first_doc[:n])


def test_labels_are_inputs_shifted_by_one_across_rows_and_batches(prepared: Manifest) -> None:
    batches = take(stream(prepared), 40)
    for b in batches:
        assert b["input_ids"].shape == b["labels"].shape == (ROWS, SEQ)
        assert b["input_ids"].dtype == b["labels"].dtype == torch.long
        assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
        assert torch.equal(b["labels"][:-1, -1], b["input_ids"][1:, 0])
    for a, b in itertools.pairwise(batches):
        assert a["labels"][-1, -1] == b["input_ids"][0, 0]
    assert any(prepared.eos_id in b["labels"] for b in batches)


def test_packer_keeps_half_consumed_documents_in_its_state(tmp_path) -> None:
    lengths = [3, 4, 5, 6, 7]  # documents of 4, 5, 6, 7, 8 tokens with their EOS
    corpus = make_corpus(tmp_path, lengths, shards=1)
    source = (Source("s", tuple(corpus.shards("train")), epochs=1),)

    def packer(state: dict) -> Packer:
        producer = DocProducer(source, state, seed=0, shuffle=False, reader=0, num_readers=1)
        return Packer(producer, row_tokens=3, rows=2, overlap=1, eos_id=EOS)

    first = packer(fresh_reader_state(1))
    windows, consumed = [], []
    for window in first.windows():
        windows.append(window.tokens)
        consumed.append([d.key for d in window.consumed])
        if len(windows) == 2:
            state = first.state()
    # 12 tokens in: 4 + 5 + 3 of document 2
    assert state["sources"][0]["todo"] == [[0, 2, 5, 3]]
    assert [len(w) for w in windows] == [7, 7, 7, 7, 4]  # the end: the one complete row left
    stream_tokens = np.concatenate([np.append(np.full(n, 10 + k), EOS)
                                    for k, n in enumerate(lengths)])
    joined = np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])
    assert np.array_equal(joined, stream_tokens[: len(joined)]) and len(joined) == 28
    assert consumed == [["d-0"], ["d-1"], ["d-2"], ["d-3"], []]  # d-4's EOS: past the last row
    resumed = [w.tokens for w in packer(state).windows()]
    assert all(np.array_equal(a, b) for a, b in zip(resumed, windows[2:], strict=True))


def test_mismatched_settings_on_resume_raise_a_clear_error(prepared: Manifest) -> None:
    s = stream(prepared, world_size=2, num_workers=2)
    take(s, 2)
    with pytest.raises(DataError, match=r"seq_len: saved 32, now 64"):
        stream(prepared, world_size=2, num_workers=2, seq_len=64).load_state_dict(s.state_dict())
    with pytest.raises(DataError, match=r"seed: saved 7, now 8"):
        stream(prepared, world_size=2, num_workers=2, seed=8).load_state_dict(s.state_dict())


def test_more_readers_than_samples_is_an_error(prepared: Manifest) -> None:
    n = sum(s.samples for s in prepared.shards("eval"))
    with pytest.raises(DataError, match="fewer than its"):
        stream(prepared, split="eval", world_size=n + 1, rank=0)


def test_eval_batches_cover_each_ranks_share_once_and_stop(prepared: Manifest) -> None:
    world, eos = 2, prepared.eos_id
    seen = Counter()
    for rank in range(world):
        batches = list(
            iter_eval_batches(
                prepared, seq_len=SEQ, micro_batch_size=ROWS, rank=rank, world_size=world
            )
        )
        tokens = [int(batches[0]["input_ids"][0, 0])] + torch.cat(
            [b["labels"].flatten() for b in batches]
        ).tolist()
        seen.update(split_docs(tokens, eos, tokens.count(eos)))
        assert all(b["input_ids"].shape[1] == SEQ for b in batches)
        assert (
            len(
                list(
                    iter_eval_batches(
                        prepared,
                        seq_len=SEQ,
                        micro_batch_size=ROWS,
                        rank=rank,
                        world_size=world,
                        max_batches=2,
                    )
                )
            )
            == 2
        )
    corpus = corpus_docs(prepared, "eval")
    assert seen <= corpus and sum(corpus.values()) - sum(seen.values()) <= world  # tails < one row


def test_eval_on_more_ranks_than_documents_gives_a_rank_nothing(tmp_path) -> None:
    corpus = make_corpus(tmp_path, [5, 6], shards=1)
    counts = [len(list(iter_eval_batches(corpus, split="train", seq_len=4, micro_batch_size=1,
                                         rank=r, world_size=3))) for r in range(3)]
    assert counts.count(0) == 1 and sum(counts) == 2  # 6 and 7 tokens with EOS: one row each
