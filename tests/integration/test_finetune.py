"""Fine-tuning runs end to end: SFT's loss masking against ``transformers``, classification
against the majority baseline, NSP pretraining on 2 ranks, epochs across a preemption, and the
bad inputs that must stop a run before it trains."""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from megatrain.data.manifest import Manifest
from megatrain.data.stream.objectives import build_objective
from megatrain.data.stream.trace import read_traces
from megatrain.data.stream.train_stream import estimate_batches_per_epoch
from megatrain.data.tokenizer import load_tokenizer
from megatrain.training.pretrained import load_trained_model
from tests.integration.helpers import TINY_BERT, env_for_tests, metrics, train

pytestmark = pytest.mark.integration
SEQ_LEN = 64  # TINY's data.seq_len


def _eval_rows(run: Path) -> list[dict]:
    return [row for row in metrics(run) if "eval_loss" in row]


def _samples(data: Path, split: str) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of a split as (key, {member: bytes}), read with the standard library."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in Manifest.load(data).shards(split):
        with tarfile.open(shard.path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(f"{shard.name}/{key}", {})[ext] = tar.extractfile(member).read()
    return sorted(samples.items())


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def test_sft_loss_masking_matches_transformers(tmp_path: Path, trained_gpt: Path,
                                               sft_dir: Path) -> None:
    """The exported model's loss with labels -100 outside the completions (each sample alone,
    truncated to data.seq_len + 1 tokens) equals megatrain's eval loss on packed rows."""
    from transformers import GPT2LMHeadModel

    run, hf = tmp_path / "sft", tmp_path / "hf"
    train(run, sft_dir, f"model.init_from={trained_gpt}", "trainer.max_steps=6",
          "optim.lr=1e-3", "trainer.eval_every=1000", "trainer.eval_steps=100000",
          f"trainer.export_to={hf}")
    ours = _eval_rows(run)[-1]["eval_loss"]
    model = GPT2LMHeadModel.from_pretrained(hf).eval()
    eos = Manifest.load(sft_dir).eos_id
    total, count = 0.0, 0
    for _, members in _samples(sft_dir, "eval"):
        tokens, mask = _npy(members["tokens.npy"]).astype(np.int64), _npy(members["mask.npy"])
        ids = torch.tensor(np.append(tokens, eos)[: SEQ_LEN + 1])
        target = torch.tensor(np.append(mask, mask[-1])[: SEQ_LEN + 1] > 0)
        labels = torch.where(target, ids, -100)
        n = int((labels[1:] != -100).sum())  # what transformers averages over (shifted)
        if n:
            with torch.no_grad():
                total += float(model(ids[None], labels=labels[None]).loss) * n
            count += n
    print(f"megatrain eval loss {ours:.6f}, transformers {total / count:.6f} over {count} tokens")
    assert ours == pytest.approx(total / count, rel=1e-4)


def test_classification_beats_the_majority_and_exports(tmp_path: Path, prepared_dir: Path,
                                                       cls_dir: Path) -> None:
    """A briefly pretrained BERT fine-tuned for 2 epochs on the stdlib-cls task: held-out
    accuracy well above the majority class's share; the exported BertForSequenceClassification
    gives megatrain's logits."""
    from transformers import BertForSequenceClassification

    pretrained = tmp_path / "bert"
    train(pretrained, prepared_dir, "trainer.max_steps=30", "optim.lr=2e-3",
          "trainer.eval_every=1000", base=TINY_BERT)
    run, hf = tmp_path / "cls", tmp_path / "hf"
    train(run, cls_dir, f"model.init_from={pretrained}", "trainer.epochs=2",
          "trainer.micro_batch_size=32", "optim.lr=2e-3", "optim.weight_decay=0.01",
          "trainer.eval_every=1000000", "trainer.eval_each_epoch=true",
          "trainer.eval_steps=100000", "trainer.keep_best=eval_accuracy",
          f"trainer.export_to={hf}", base=TINY_BERT)
    held_out = [int(members["cls"]) for _, members in _samples(cls_dir, "eval")]
    majority = Counter(held_out).most_common(1)[0][1] / len(held_out)
    accuracy = max(row["eval_accuracy"] for row in _eval_rows(run))
    print(f"held-out accuracy {accuracy:.3f}, majority class {majority:.3f}")
    assert accuracy > majority + 0.15

    model, _ = load_trained_model(run / "checkpoints" / json.loads(
        (run / "checkpoints" / "best.json").read_text())["checkpoint"])
    reference = BertForSequenceClassification.from_pretrained(hf).eval()
    assert reference.config.id2label[0] == Manifest.load(cls_dir).task["labels"][0]
    _, members = _samples(cls_dir, "eval")[0]
    ids = torch.tensor(_npy(members["tokens.npy"]).astype(np.int64)[:SEQ_LEN])[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, rtol=1e-4, atol=1e-5)


def test_nsp_pretraining_on_two_ranks(tmp_path: Path, uneven_docs: Path) -> None:
    """MLM + next-sentence prediction under ZeRO-2 on 2 ranks: both losses are logged, the MLM
    loss falls, and the exported BertForPreTraining's two heads give
    megatrain's logits. (The NSP loss of a model this small barely moves in 40 steps, nor does
    transformers' on the same batches: docs/finetuning.md, "How fast NSP learns".)"""
    from transformers import BertForPreTraining

    run, hf = tmp_path / "nsp", tmp_path / "hf"
    train(run, uneven_docs, "data.nsp=next", "deepspeed=zero2", "trainer.max_steps=40",
          "trainer.micro_batch_size=16", "optim.lr=3e-3", "trainer.log_every=5",
          "trainer.eval_every=1000", f"trainer.export_to={hf}", base=TINY_BERT, nproc=2)
    logged = [row for row in metrics(run) if "loss" in row]
    first, last = logged[0], logged[-1]
    print(f"mlm {first['mlm_loss']:.4f} -> {last['mlm_loss']:.4f}, "
          f"nsp {first['nsp_loss']:.4f} -> {last['nsp_loss']:.4f}")
    assert last["mlm_loss"] < first["mlm_loss"] - 0.5
    assert all(math.isfinite(row["nsp_loss"]) and row["nsp_loss"] < 1.0 for row in logged)
    assert 0.0 <= _eval_rows(run)[-1]["eval_nsp_accuracy"] <= 1.0
    model, _ = load_trained_model(run / "checkpoints")
    reference = BertForPreTraining.from_pretrained(hf).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (2, SEQ_LEN), generator=generator)
    types = (torch.arange(SEQ_LEN) >= SEQ_LEN // 2).long().expand(2, -1)
    with torch.no_grad():
        mlm, nsp = model(ids, token_type_ids=types)
        out = reference(ids, token_type_ids=types)
    torch.testing.assert_close(mlm, out.prediction_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(nsp, out.seq_relationship_logits, rtol=1e-4, atol=1e-5)


def test_epochs_see_every_sample_three_times_across_a_preemption(tmp_path: Path,
                                                                 trained_gpt: Path,
                                                                 sft_dir: Path) -> None:
    """trainer.epochs=3 on 2 ranks, preempted inside epoch 2 and run again: the traces hold every
    training sample exactly 3 times, and the run ended by itself when the data did."""
    run = tmp_path / "epochs"
    args = (f"model.init_from={trained_gpt}", "trainer.epochs=3", "data.trace=true",
            "trainer.micro_batch_size=8", "trainer.eval_every=1000000", "trainer.log_every=1",
            "trainer.save_every=1000000")
    manifest = Manifest.load(sft_dir)
    objective = build_objective("sft", SEQ_LEN, load_tokenizer(manifest.tokenizer_path))
    per_epoch = estimate_batches_per_epoch(manifest, objective, micro_batch_size=8,
                                           world_size=2, num_workers=1, epochs=3)
    preempt = round(1.5 * per_epoch)
    env = env_for_tests() | {"MEGATRAIN_FAULT_PREEMPT": str(preempt)}
    stopped = train(run, sft_dir, *args, nproc=2, check=False, env=env)
    assert stopped.returncode != 0 and (run / "checkpoints" / f"step_{preempt}").is_dir()
    train(run, sft_dir, *args, nproc=2)
    traces = read_traces(run)
    at_stop = {e for lines in traces.values() for line in lines if line["step"] == preempt
               for e in line["epochs"]}
    assert at_stop == {1}, at_stop  # the run stopped inside the second epoch (index 1)
    keys = Counter(key for lines in traces.values() for line in lines for key in line["keys"])
    samples = sum(shard.samples for shard in manifest.shards("train"))
    assert len(keys) == samples and set(keys.values()) == {3}


def test_a_checkpoint_of_another_family_stops_a_fine_tune(tmp_path: Path, trained_gpt: Path,
                                                          cls_dir: Path) -> None:
    """A GPT checkpoint to start a BERT classifier from: one line naming model.init_from and
    both families, exit 2, before any training step."""
    run = tmp_path / "cls"
    result = train(run, cls_dir, f"model.init_from={trained_gpt}", check=False, base=TINY_BERT)
    assert result.returncode == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, result.stderr[-2000:]
    assert re.search("model.init_from=.* is a gpt model, but model.family=bert", error[0])
    assert not (run / "metrics.jsonl").exists()
