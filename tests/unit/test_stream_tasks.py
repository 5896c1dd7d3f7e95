"""Task data in the stream: extra members, sft/cls/seq2seq batches by hand, truncation, drops,
packing parity with a real GPT, exact and elastic resume, finite epochs, batch counts."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.tokenization_python import PythonBackend

from megatrain.data.manifest import Manifest
from megatrain.data.prepare import prepare
from megatrain.data.prepare.shard_writer import npy_bytes
from megatrain.data.prepare.train_tokenizer import train_tokenizer
from megatrain.data.stream.mixture import Source
from megatrain.data.stream.objectives import IGNORE, build_objective
from megatrain.data.stream.order import Doc
from megatrain.data.stream.shard_reader import parse_shard
from megatrain.data.stream.tasks import (
    Classification,
    Seq2Seq,
    SupervisedLM,
    TaskObjective,
    longest_first,
)
from megatrain.data.stream.train_stream import (
    TrainStream,
    build_train_stream,
    estimate_batches,
    iter_eval_batches,
)
from megatrain.data.tokenizer import load_tokenizer
from megatrain.errors import ConfigError, DataError
from megatrain.models import GPTConfig, get_model_spec
from tests.unit.stream_corpus import make_corpus
from tests.unit.task_corpus import (
    CLS,
    EOS,
    PAD,
    SEP,
    TOKENIZER,
    Row,
    cls_rows,
    seq2seq_rows,
    sft_rows,
    write_shard,
    write_task_corpus,
)

X = IGNORE


def doc(tokens: list[int], *, mask: list[int] | None = None, cls: int | None = None) -> Doc:
    """A document (key ``k``) as the reader produces it, with its extra members."""
    extra = {} if mask is None else {"mask": np.asarray(mask, np.uint8)}
    if cls is not None:
        extra["cls"] = cls
    return Doc(np.asarray(tokens, np.uint16), len(tokens) + 1, "k", 0, 0, 0, 0, (), (0,), extra)


def stream(manifest: Manifest, objective: TaskObjective, **overrides) -> TrainStream:
    args = {"seq_len": objective.seq_len, "micro_batch_size": 2, "seed": 5, "rank": 0,
            "world_size": 1, "num_workers": 0, "objective": objective}
    return build_train_stream(manifest, **(args | overrides))


def drain(s: TrainStream, limit: int | None = None) -> tuple[list[dict], list[str]]:
    """Batches (up to ``limit``) and the keys they consumed, in order."""
    batches, keys = [], []
    it = iter(s)
    for batch in itertools.islice(it, limit):
        batches.append(batch)
        keys += s.pop_trace()[0]
    it.close()
    return batches, keys


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def rows_of(batch: dict, key: str) -> list[list[int]]:
    return batch[key].tolist()


# --- reading ---------------------------------------------------------------------------------


def test_the_reader_decodes_extra_members_and_skips_a_sample_whose_member_is_corrupt(
        tmp_path: Path) -> None:
    good = Row("a", [10, 11, 12], mask=[0, 1, 1], target=[20], cls=2)
    header = npy_bytes(np.ones(2, np.uint16))
    garbled = header[:20] + b"{(((" + header[24:]
    rows = [good,
            Row("short-mask", [10, 11], mask=[1]),
            Row("wide-mask", [10], raw={"mask.npy": npy_bytes(np.ones(1, np.int64))}),
            Row("bad-cls", [10], raw={"cls": b"two"}),
            Row("cut-target", [10], raw={"target.npy": npy_bytes(np.ones(4, np.uint16))[:-3]}),
            Row("pretraining", [10, 11]),
            Row("garbled-header", [10], raw={"tokens.npy": garbled})]  # numpy: TokenError
    shard = write_shard(tmp_path / "train-000000.tar", rows)
    read = parse_shard(shard.path.read_bytes(), len(rows), shard.name)
    assert read.keys == [r.key for r in rows]
    assert [t is None for t in read.tokens] == [False, True, True, True, True, False, True]
    extra = read.extras[0]
    assert extra["mask"].tolist() == [0, 1, 1] and extra["mask"].dtype == np.uint8
    assert extra["target"].tolist() == [20] and extra["cls"] == 2
    assert read.extras[5] is None  # a pretraining sample: nothing decoded
    assert [e.split(": ")[0] for e in read.errors] == [
        "train-000000.tar:short-mask.mask.npy", "train-000000.tar:wide-mask.mask.npy",
        "train-000000.tar:bad-cls.cls", "train-000000.tar:cut-target.target.npy",
        "train-000000.tar:garbled-header"]
    assert "uint8[2]" in read.errors[0] and "int64[1], expected" in read.errors[1]
    assert "b'two' is not a class id" in read.errors[2]


def test_a_sample_with_a_corrupt_or_missing_member_is_skipped_and_counted(
        tmp_path: Path) -> None:
    rows = sft_rows(12)
    rows[5] = Row(rows[5].key, rows[5].tokens, raw={"mask.npy": b"garbage"})
    rows[7] = Row(rows[7].key, rows[7].tokens)  # no mask.npy
    manifest = write_task_corpus(tmp_path, "sft", rows, shards=2)
    s = stream(manifest, SupervisedLM(16, EOS, PAD), epochs=1)
    _, keys = drain(s)
    assert sorted(keys) == sorted(r.key for k, r in enumerate(rows) if k not in (5, 7))
    assert s.metrics()["data_skipped"] == 2
    strict = stream(manifest, SupervisedLM(16, EOS, PAD), epochs=1, max_skip_fraction=0.05)
    with pytest.raises(DataError, match=r"train-00000\d.tar:s-[57]\.?\w*: .*(mask.npy|magic)"):
        drain(strict)
    # loss_on=all needs no mask: the sample without one is read
    _, keys = drain(stream(manifest, SupervisedLM(16, EOS, PAD, "all"), epochs=1))
    assert rows[7].key in keys and rows[5].key not in keys


def test_a_task_objective_refuses_a_pretraining_corpus_or_another_format(tmp_path: Path) -> None:
    pretraining = make_corpus(tmp_path / "pre", [5] * 8, shards=2)
    with pytest.raises(ConfigError, match="sft needs task data; .* is a pretraining corpus"):
        stream(pretraining, SupervisedLM(16, EOS, PAD))
    manifest = write_task_corpus(tmp_path / "cls", "cls", cls_rows(6), labels=["a", "b", "c"])
    stream(manifest, Classification(8, CLS, SEP, PAD))
    with pytest.raises(ConfigError, match="data.objective=sft does not fit .*--format cls"):
        stream(manifest, SupervisedLM(8, EOS, PAD))


# --- sft ---------------------------------------------------------------------------------------

A = Row("a", [10, 11, 12, 13], mask=[0, 0, 1, 1])
B = Row("b", [20, 21, 22], mask=[0, 1, 1])
C = Row("c", [30, 31, 32, 33, 34, 35, 36], mask=[0, 0, 0, 1, 1, 1, 1])
D = Row("d", [40, 41], mask=[0, 0])  # no completion: dropped
E = Row("e", list(range(50, 60)), mask=[0] * 5 + [1] * 5)  # 10 tokens + EOS: cut to 9


def test_packed_sft_rows_by_hand(tmp_path: Path) -> None:
    manifest = write_task_corpus(tmp_path, "sft", [A, B, C, D, E], shards=1)
    s = stream(manifest, SupervisedLM(8, EOS, PAD), shuffle=False, epochs=1)
    batches, keys = drain(s)
    assert len(batches) == 2 and keys == ["a", "b", "c", "d", "e"]
    first, second = batches
    assert rows_of(first, "input_ids") == [[10, 11, 12, 13, 20, 21, 22, PAD],
                                           [30, 31, 32, 33, 34, 35, 36, PAD]]
    assert rows_of(first, "labels") == [[X, 12, 13, EOS, 21, 22, EOS, X],
                                        [X, X, 33, 34, 35, 36, EOS, X]]
    assert rows_of(first, "doc_ids") == [[0, 0, 0, 0, 1, 1, 1, 2], [0] * 7 + [1]]
    # e keeps its first seq_len + 1 = 9 tokens: the end of its completion (and EOS) is cut
    assert rows_of(second, "input_ids") == [list(range(50, 58))]
    assert rows_of(second, "labels") == [[X, X, X, X, 55, 56, 57, 58]]
    assert rows_of(second, "doc_ids") == [[0] * 8]
    assert s.metrics()["data_dropped"] == 1 and s.metrics()["data_skipped"] == 0


def test_unpacked_sft_rows_are_padded_to_the_longest_rounded_up_to_8(tmp_path: Path) -> None:
    manifest = write_task_corpus(tmp_path, "sft", [A, B, C, D, E], shards=1)
    s = stream(manifest, SupervisedLM(16, EOS, PAD, packing=False), shuffle=False, epochs=1)
    batches, keys = drain(s)
    assert keys == ["a", "b", "c", "d", "e"] and [b.keys() for b in batches] == [
        {"input_ids", "labels"}] * 2
    first, second = batches
    assert rows_of(first, "input_ids") == [[10, 11, 12, 13] + [PAD] * 4, [20, 21, 22] + [PAD] * 5]
    assert rows_of(first, "labels") == [[X, 12, 13, EOS] + [X] * 4, [21, 22, EOS] + [X] * 5]
    assert second["input_ids"].shape == (2, 16)  # e: 10 inputs (its EOS a label) -> 16
    assert rows_of(second, "labels")[1] == [X] * 4 + [55, 56, 57, 58, 59, EOS] + [X] * 6


def test_sft_without_a_pad_token_pads_with_eos_and_still_trains_eos(tmp_path: Path) -> None:
    """GPT-2's tokenizer has no pad: rows are filled with EOS, which is never a label there,
    while every sample's own EOS still is (labels come from masks, not from token ids)."""
    obj = build_objective("sft", 16, SimpleNamespace(**(vars(TOKENIZER) | {"pad_id": -1})),
                          sft_packing=False)
    manifest = write_task_corpus(tmp_path, "sft", [A, B], shards=1)
    (batch,), _ = drain(stream(manifest, obj, shuffle=False, epochs=1))
    assert rows_of(batch, "input_ids") == [[10, 11, 12, 13] + [EOS] * 4, [20, 21, 22] + [EOS] * 5]
    assert rows_of(batch, "labels") == [[X, 12, 13, EOS] + [X] * 4, [21, 22, EOS] + [X] * 5]


@pytest.mark.parametrize("loss_on, labels", [
    ("completion", [11, 12, X, 14, 15, EOS]),
    ("last_turn", [X, X, X, 14, 15, EOS]),
    ("all", [11, 12, 13, 14, 15, EOS]),
])
def test_sft_loss_on(loss_on: str, labels: list[int]) -> None:
    chat = doc([10, 11, 12, 13, 14, 15], mask=[0, 1, 1, 0, 2, 2])  # user, turn 1, user, turn 2
    sample = SupervisedLM(16, EOS, PAD, loss_on).sample(chat)
    assert sample.arrays[0].tolist() == [10, 11, 12, 13, 14, 15]
    assert sample.arrays[1].tolist() == labels


def test_sft_drops_a_sample_left_without_targets() -> None:
    chat = doc([10, 11, 12, 13, 14, 15], mask=[0, 1, 1, 0, 2, 2])
    assert SupervisedLM(3, EOS, PAD, "last_turn").sample(chat) is None  # turn 2 cut away
    assert SupervisedLM(3, EOS, PAD).sample(chat).arrays[1].tolist() == [11, 12, X]
    assert SupervisedLM(8, EOS, PAD).sample(doc([10, 11], mask=[0, 0])) is None
    assert SupervisedLM(8, EOS, PAD, "all").sample(doc([])) is None  # EOS alone: no label
    # the EOS takes the last token's mask: a completion cut to its last token still trains EOS
    assert SupervisedLM(8, EOS, PAD).sample(doc([10, 11], mask=[0, 1])).arrays[1].tolist() == [
        11, EOS]


def test_drops_survive_a_checkpoint_and_an_elastic_resume(tmp_path: Path) -> None:
    rows = sft_rows(40, seed=3)
    for k in range(0, 40, 5):
        rows[k] = Row(rows[k].key, rows[k].tokens, mask=[0] * len(rows[k].tokens))
    manifest = write_task_corpus(tmp_path, "sft", rows)
    obj = SupervisedLM(16, EOS, PAD)
    s = stream(manifest, obj, epochs=1)
    drain(s, 4)
    dropped = s.metrics()["data_dropped"]
    again = stream(manifest, obj, epochs=1)
    again.load_state_dict(s.state_dict())
    assert again.metrics()["data_dropped"] == dropped > 0
    drain(again)
    assert again.metrics()["data_dropped"] == 8
    halves = [stream(manifest, obj, epochs=1, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        drain(h, 2)
    one = stream(manifest, obj, epochs=1)
    one.load_state_dict([h.state_dict() for h in halves])
    drain(one)
    assert one.metrics()["data_dropped"] == 8


def test_packed_rows_give_each_sample_its_loss_alone_in_a_real_gpt(tmp_path: Path) -> None:
    manifest = write_task_corpus(tmp_path, "sft", sft_rows(24, seed=1), shards=2)
    seq = 32
    batches, _ = drain(stream(manifest, SupervisedLM(seq, EOS, PAD), micro_batch_size=4,
                              epochs=1))
    config = GPTConfig(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=64,
                       max_seq_len=seq, attn_impl="sdpa")
    torch.manual_seed(0)
    model = get_model_spec("gpt").build(config, torch.device("cpu"), torch.float32).eval()
    packed_losses, alone_losses = [], []
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["input_ids"], doc_ids=batch["doc_ids"])
            tokens = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                     ignore_index=X, reduction="none").view_as(batch["labels"])
            for r in range(len(batch["input_ids"])):
                docs, labels = batch["doc_ids"][r], batch["labels"][r]
                for d in docs.unique():
                    where = (docs == d).nonzero().flatten()
                    if (labels[where] == X).all():
                        continue  # the padding document (a sample always has a label)
                    packed_losses.append(tokens[r, where].sum())
                    alone = model(batch["input_ids"][r, where][None])
                    alone_losses.append(F.cross_entropy(alone[0], labels[where], ignore_index=X,
                                                        reduction="sum"))
    assert len(packed_losses) >= 20 and sum(len(b["input_ids"]) for b in batches) < 20
    torch.testing.assert_close(torch.stack(packed_losses), torch.stack(alone_losses),
                               rtol=1e-5, atol=1e-5)


# --- cls ---------------------------------------------------------------------------------------


def test_longest_first_is_hugging_faces() -> None:
    hf = SimpleNamespace(truncation_side="right")
    for la, lb in itertools.product(range(7), range(7)):
        a, b = list(range(la)), list(range(100, 100 + lb))
        for remove in range(1, la + lb + 1):
            ids, pair, _ = PythonBackend.truncate_sequences(hf, a, b, remove, "longest_first")
            assert longest_first(la, lb, remove) == (la - len(ids), lb - len(pair)), (la, lb)


def test_cls_batches_by_hand(tmp_path: Path) -> None:
    rows = [Row("pair", [CLS, 10, 11, 12, 13, 14, SEP, 20, 21, SEP], cls=2),  # 10 > 8: cut a by 2
            Row("single", [CLS, *range(10, 19), SEP], cls=0),  # 11: its end cut
            Row("short", [CLS, 30, SEP], cls=1)]
    manifest = write_task_corpus(tmp_path, "cls", rows, shards=1, labels=["x", "y", "z"])
    batches, _ = drain(stream(manifest, Classification(8, CLS, SEP, PAD, 3), shuffle=False,
                              epochs=1))
    first, second = batches
    assert rows_of(first, "input_ids") == [[CLS, 10, 11, 12, SEP, 20, 21, SEP],
                                           [CLS, 10, 11, 12, 13, 14, 15, SEP]]
    assert rows_of(first, "token_type_ids") == [[0, 0, 0, 0, 0, 1, 1, 1], [0] * 8]
    assert rows_of(first, "attention_mask") == [[1] * 8] * 2
    assert first["labels"].tolist() == [2, 0]
    assert rows_of(second, "input_ids") == [[CLS, 30, SEP] + [PAD] * 5]
    assert rows_of(second, "attention_mask") == [[1, 1, 1] + [0] * 5]
    assert rows_of(second, "token_type_ids") == [[0] * 8] and second["labels"].tolist() == [1]


def test_cls_refuses_a_label_outside_the_manifests_set() -> None:
    with pytest.raises(DataError, match="sample k: class 3 is not one of the corpus's 3 labels"):
        Classification(8, CLS, SEP, PAD, 3).sample(doc([CLS, 10, SEP], cls=3))


# --- seq2seq -----------------------------------------------------------------------------------


def test_seq2seq_batches_by_hand(tmp_path: Path) -> None:
    rows = [Row("long", [10, 11, 12, 13, 14], target=[20, 21, 22, 23]),
            Row("short", [30], target=[40])]
    manifest = write_task_corpus(tmp_path, "seq2seq", rows, shards=1)
    (batch,), _ = drain(stream(manifest, Seq2Seq(4, 3, EOS, PAD), shuffle=False, epochs=1))
    assert rows_of(batch, "input_ids") == [[10, 11, 12, EOS], [30, EOS, PAD, PAD]]
    assert rows_of(batch, "attention_mask") == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert rows_of(batch, "labels") == [[20, 21, EOS], [40, EOS, X]]
    assert rows_of(batch, "decoder_input_ids") == [[PAD, 20, 21], [PAD, 40, PAD]]
    (wide,), _ = drain(stream(manifest, Seq2Seq(32, 32, EOS, PAD), shuffle=False, epochs=1))
    assert wide["input_ids"].shape == (2, 8) and wide["labels"].shape == (2, 8)


# --- build_objective ---------------------------------------------------------------------------


def test_build_objective_makes_the_task_objectives() -> None:
    sft = build_objective("sft", 64, TOKENIZER, sft_loss_on="last_turn", sft_packing=False)
    assert sft == SupervisedLM(64, EOS, PAD, "last_turn", packing=False)
    assert build_objective("cls", 64, TOKENIZER, num_labels=4) == Classification(64, CLS, SEP,
                                                                                  PAD, 4)
    assert build_objective("seq2seq", 64, TOKENIZER, target_len=16) == Seq2Seq(64, 16, EOS, PAD)
    assert build_objective("seq2seq", 64, TOKENIZER).target_len == 64


@pytest.mark.parametrize("name, changes, message", [
    ("cls", {"sep_id": -1}, r"cls needs \[SEP\]"),
    ("seq2seq", {"pad_id": -1}, "seq2seq needs a pad token"),
])
def test_build_objective_names_the_token_a_tokenizer_lacks(name: str, changes: dict,
                                                           message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_objective(name, 64, SimpleNamespace(**(vars(TOKENIZER) | changes)))


def test_bad_task_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="data.sft.loss_on=everything"):
        build_objective("sft", 64, TOKENIZER, sft_loss_on="everything")
    with pytest.raises(ConfigError, match="data.doc_masking applies to clm and mlm, not sft"):
        build_objective("sft", 64, TOKENIZER, doc_masking=True)
    with pytest.raises(ConfigError, match="seq_len >= 3"):
        build_objective("cls", 2, TOKENIZER)


# --- resume, ranks, epochs ---------------------------------------------------------------------

OBJECTIVES = {"sft": SupervisedLM(16, EOS, PAD), "cls": Classification(8, CLS, SEP, PAD, 3),
              "seq2seq": Seq2Seq(8, 4, EOS, PAD)}
ROWS = {"sft": sft_rows, "cls": cls_rows, "seq2seq": seq2seq_rows}


@pytest.fixture(params=sorted(OBJECTIVES))
def task(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Manifest, TaskObjective]:
    name = request.param
    manifest = write_task_corpus(tmp_path, name, ROWS[name](45, seed=2), shards=4,
                                 labels=["x", "y", "z"])
    return manifest, OBJECTIVES[name]


def test_a_resumed_stream_yields_bit_identical_batches(task) -> None:
    manifest, obj = task
    full, _ = drain(stream(manifest, obj, micro_batch_size=3), 30)
    for stop in (1, 7, 16):  # 16: inside the second epoch
        s = stream(manifest, obj, micro_batch_size=3)
        head, _ = drain(s, stop)
        again = stream(manifest, obj, micro_batch_size=3)
        again.load_state_dict(s.state_dict())
        tail, _ = drain(again, 30 - stop)
        assert same(head + tail, full), stop


def test_two_ranks_read_the_same_samples_per_epoch_as_one_and_an_elastic_resume(task) -> None:
    manifest, obj = task
    everything = sorted(r.key for r in ROWS[obj.name](45, seed=2))
    _, one = drain(stream(manifest, obj, epochs=1))
    ranks = [drain(stream(manifest, obj, epochs=1, rank=r, world_size=2))[1] for r in range(2)]
    assert sorted(one) == sorted(ranks[0] + ranks[1]) == everything
    # stopped on 2 ranks, resumed on 1 (and the other way round): each sample once
    halves = [stream(manifest, obj, epochs=1, rank=r, world_size=2) for r in range(2)]
    seen = [k for h in halves for k in drain(h, 3)[1]]
    single = stream(manifest, obj, epochs=1)
    single.load_state_dict([h.state_dict() for h in halves])
    seen += drain(single)[1]
    assert sorted(seen) == everything
    first = stream(manifest, obj, epochs=1)
    seen = drain(first, 4)[1]
    for r in range(2):
        rank = stream(manifest, obj, epochs=1, rank=r, world_size=2)
        rank.load_state_dict([first.state_dict()])
        seen += drain(rank)[1]
    assert sorted(seen) == everything


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_three_epochs_read_every_sample_three_times_across_a_resume_in_epoch_two(
        tmp_path: Path) -> None:
    rows = sft_rows(50, seed=4, lengths=(14, 20))
    for k in range(16):  # the first reader's share (in natural order): short, so it ends first
        rows[k] = Row(rows[k].key, [10, 11, 12], mask=[0, 1, 1])
    manifest = write_task_corpus(tmp_path, "sft", rows, shards=3)
    obj = SupervisedLM(24, EOS, PAD)
    args = {"micro_batch_size": 2, "num_workers": 3, "epochs": 3, "shuffle": False}
    s = stream(manifest, obj, **args)
    full, trace = [], []
    it = iter(s)
    for batch in it:
        full.append(batch)
        trace.append(s.pop_trace())
    keys = Counter(k for ks, _ in trace for k in ks)
    assert keys == Counter({r.key: 3 for r in rows})
    assert Counter(zip(*map(itertools.chain.from_iterable, zip(*trace)))) == Counter(
        {(r.key, e): 1 for r in rows for e in range(3)})
    # stop inside epoch 2, and after the first reader has ended (its turn is skipped from
    # then on), resume: the same batches
    in_two = next(i for i, (_, e) in enumerate(trace) if 1 in e) + 2
    for stop in (in_two, len(full) - 4, len(full) - 3):
        first = stream(manifest, obj, **args)
        head, seen = drain(first, stop)
        again = stream(manifest, obj, **args)
        again.load_state_dict(first.state_dict())
        tail, rest = drain(again)
        assert same(head + tail, full), stop  # and the resumed stream ended where full did
        assert Counter(seen + rest) == keys


def test_epochs_end_pretraining_cleanly_and_a_mixture_limit_still_raises(tmp_path: Path) -> None:
    manifest = make_corpus(tmp_path / "c", [40] * 30, shards=3)
    s = build_train_stream(manifest, seq_len=16, micro_batch_size=4, seed=1, rank=0,
                           world_size=1, num_workers=0, epochs=2)
    _, keys = drain(s)
    counts = Counter(keys)  # the concatenating packer leaves out the last partial row
    assert set(counts) == {f"d-{k}": 2 for k in range(30)}.keys()
    assert sorted(counts.values())[1:] == [2] * 29
    limited = [Source("c", tuple(manifest.shards("train")), epochs=1)]
    s = build_train_stream(manifest, seq_len=16, micro_batch_size=4, seed=1, rank=0,
                           world_size=1, num_workers=0, sources=limited)
    with pytest.raises(DataError, match="the training data ran out"):
        drain(s)
    with pytest.raises(ConfigError, match="has epochs: 1, but trainer.epochs=2"):
        build_train_stream(manifest, seq_len=16, micro_batch_size=4, seed=1, rank=0,
                           world_size=1, num_workers=0, sources=limited, epochs=2)


# --- counting batches --------------------------------------------------------------------------


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1)])
def test_batch_counts_are_exact_for_one_sample_per_row(task, world: int, workers: int) -> None:
    manifest, obj = task
    if obj.packing:
        obj = SupervisedLM(obj.seq_len, EOS, PAD, packing=False)
    for epochs in (1, 2):
        count = estimate_batches(manifest, obj, micro_batch_size=4, world_size=world,
                                 num_workers=workers, epochs=epochs)
        actual = [len(drain(stream(manifest, obj, micro_batch_size=4, rank=r, world_size=world,
                                   num_workers=workers, epochs=epochs))[0])
                  for r in range(world)]
        assert count.exact and count.per_rank == actual


def test_batch_counts_for_packed_rows_are_estimates_within_15_percent(tmp_path: Path) -> None:
    manifest = write_task_corpus(tmp_path / "sft", "sft", sft_rows(300, seed=6, lengths=(3, 40)))
    pretraining = make_corpus(tmp_path / "pre", list(np.random.default_rng(0).integers(5, 60, 300)))
    for corpus, obj, seq in ((manifest, SupervisedLM(64, EOS, PAD), 64), (pretraining, None, 32)):
        s = build_train_stream(corpus, seq_len=seq, micro_batch_size=2, seed=1, rank=0,
                               world_size=1, num_workers=0, epochs=2, objective=obj)
        actual = len(drain(s)[0])
        count = estimate_batches(corpus, s.config.objective, micro_batch_size=2, world_size=1,
                                 num_workers=0, epochs=2)
        assert not count.exact
        assert abs(count.per_rank[0] - actual) <= 0.15 * actual, (count, actual)


def test_eval_batches_of_a_task_corpus(tmp_path: Path) -> None:
    rows = cls_rows(9, seed=8)
    manifest = write_task_corpus(tmp_path, "cls", cls_rows(6), labels=["x", "y", "z"],
                                 eval_rows=rows)
    batches = list(iter_eval_batches(manifest, seq_len=16, micro_batch_size=4, rank=0,
                                     world_size=1, objective=Classification(16, CLS, SEP, PAD)))
    assert [len(b["labels"]) for b in batches] == [4, 4, 1]
    assert torch.cat([b["labels"] for b in batches]).tolist() == [r.cls for r in rows]


# --- with the real producer --------------------------------------------------------------------


def test_the_stream_reads_what_megatrain_prepare_writes(tmp_path: Path) -> None:
    texts = ["the quick brown fox jumps over the lazy dog", "a stunning film", "a dull plot",
             "Translate: good morning", "guten Morgen", "Add 2 and 3.", "Said it."] * 3
    tok = load_tokenizer(train_tokenizer(texts, tmp_path / "tokenizer.model", 450))
    formats = {
        "sft": ([{"prompt": "Add 2 and 3.", "completion": "5"},
                 {"prompt": "Say it.", "completion": "Said it."}], ["5", "Said it."]),
        "cls": ([{"text": "a stunning film", "label": "pos"},
                 {"text_a": "a dull plot", "text_b": "guten Morgen", "label": "neg"}], [1, 0]),
        "seq2seq": ([{"input": "Translate: good morning", "target": "guten Morgen"},
                     {"input": "the quick", "target": "fox"}], ["guten Morgen", "fox"]),
    }
    for fmt, (rows, targets) in formats.items():
        source = tmp_path / f"{fmt}.jsonl"
        source.write_text("\n".join(json.dumps(r) for r in rows))
        manifest = prepare(str(source), tmp_path / fmt, format=fmt, tokenizer=str(tok.path),
                           workers=1, eval_fraction=0.0, progress=False)
        obj = build_objective(fmt, 32, tok, num_labels=len(manifest.task.get("labels", [])))
        (batch,), keys = drain(stream(manifest, obj, micro_batch_size=4, shuffle=False,
                                      epochs=1))
        assert len(keys) == 2
        labels = batch["labels"].tolist()
        if fmt == "cls":
            assert labels == targets
            assert batch["token_type_ids"][1].sum() == len(tok.encode("guten Morgen")) + 1
            continue
        if fmt == "sft":  # packed: one row, each completion and its EOS
            docs = batch["doc_ids"][0].tolist()
            labels = [[t for t, d in zip(labels[0], docs) if d == j] for j in (0, 1)]
        for row, target in zip(labels, targets):
            trained = [t for t in row if t != X]
            assert trained[-1] == tok.eos_id and tok.decode(trained[:-1]) == target
