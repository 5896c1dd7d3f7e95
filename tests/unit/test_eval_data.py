"""A fixed validation set: ``megatrain-prepare --eval-fraction 1`` writes an eval-only folder
(every document in the eval split), which a training run takes as ``data.eval`` and
megatrain-eval as ``--data`` (the same numbers as the file it was prepared from)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatrain.cli.eval import main as eval_main
from megatrain.cli.prepare import main as prepare_main
from megatrain.config.schema import DataConfig
from megatrain.data.manifest import Manifest
from megatrain.data.prepare.pipeline import prepare
from megatrain.data.stream.train_stream import iter_eval_batches
from megatrain.errors import ConfigError, DataError
from megatrain.models.registry import get_model_spec
from megatrain.training.data_setup import resolve_train_data
from megatrain.training.trainer import Trainer
from tests.unit.eval_fixtures import CORPUS, DOCS, tiny_checkpoint

OPTIONS = {"workers": 1, "progress": False}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _eval_only(tmp_path: Path, source: Path, tokenizer: Path, name: str, **options: object
               ) -> Path:
    out = tmp_path / name
    assert prepare_main(["--source", str(source), "--out", str(out), "--tokenizer",
                         str(tokenizer), "--eval-fraction", "1", "--workers", "1",
                         "--no-progress", *[str(x) for kv in options.items() for x in kv]]) == 0
    return out


def test_an_eval_only_folder_is_data_eval_of_a_run(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path, "gpt")
    docs = _jsonl(tmp_path / "valid.jsonl", [{"text": t} for t in DOCS])
    valid = _eval_only(tmp_path, docs, ckpt / "tokenizer.model", "valid")
    manifest = Manifest.load(valid)
    assert not manifest.splits["train"] and manifest.stats["eval_documents"] == len(DOCS)
    (tmp_path / "train.txt").write_text(CORPUS)
    train = prepare(str(tmp_path / "train.txt"), tmp_path / "train",
                    tokenizer=str(ckpt / "tokenizer.model"), **OPTIONS)
    _, train_manifest, eval_manifest = resolve_train_data(
        DataConfig(train=str(tmp_path / "train"), eval=str(valid)), None)
    assert eval_manifest.root == str(valid) and train_manifest.root == str(train.root)
    cfg = SimpleNamespace(data=DataConfig(train="TRAIN", eval=str(valid)),
                          model=SimpleNamespace(family="gpt"))
    trainer = SimpleNamespace(cfg=cfg, spec=get_model_spec("gpt"), train_manifest=train_manifest,
                              eval_manifest=eval_manifest)
    assert Trainer._task(trainer) == "clm"
    batches = list(iter_eval_batches(eval_manifest, seq_len=16, micro_batch_size=2, rank=0,
                                     world_size=1))
    labelled = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert 0 < labelled <= manifest.stats["eval_tokens"] + len(DOCS)  # its documents + EOS
    with pytest.raises(DataError, match="no shards for split 'train' .*splits with data: eval"):
        manifest.shards("train")  # as data.train it has nothing to train on




def test_megatrain_eval_reads_a_prepared_folder_as_its_source_file(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path, "llama")
    docs = _jsonl(tmp_path / "valid.jsonl", [{"text": t} for t in DOCS])
    valid = _eval_only(tmp_path, docs, ckpt / "tokenizer.model", "valid")
    results = []
    for data in (docs, valid):
        out = tmp_path / f"{data.name}.json"
        assert eval_main(["--checkpoint", str(ckpt), "--task", "perplexity", "--data",
                          str(data), "--out", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["metrics"] == pytest.approx(results[1]["metrics"], rel=1e-6)
    assert results[1]["data"]["sha256"] != results[0]["data"]["sha256"]


def test_task_folders_score_as_their_rows(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path, "t5")
    rows = _jsonl(tmp_path / "s2s.jsonl", [{"input": "the cat", "target": "le chat"},
                                           {"input": "我爱北京", "target": "I love Beijing"}])
    folder = _eval_only(tmp_path, rows, ckpt / "tokenizer.model", "s2s", **{"--format":
                                                                           "seq2seq"})
    metrics = []
    for data in (rows, folder):
        out = tmp_path / f"{data.name}.json"
        assert eval_main(["--checkpoint", str(ckpt), "--task", "target_loss", "--data",
                          str(data), "--out", str(out)]) == 0
        metrics.append(json.loads(out.read_text())["metrics"])
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-6)


def test_eval_only_needs_the_models_tokenizer(tmp_path: Path) -> None:
    docs = _jsonl(tmp_path / "valid.jsonl", [{"text": t} for t in DOCS])
    with pytest.raises(ConfigError, match="eval-only folder .* give --tokenizer"):
        prepare(str(docs), tmp_path / "out", eval_fraction=1.0, **OPTIONS)
    with pytest.raises(ConfigError, match=r"eval_fraction must be in \[0, 1\], got 1.5"):
        prepare(str(docs), tmp_path / "out", eval_fraction=1.5, **OPTIONS)


def test_a_folder_of_another_tokenizer_is_refused(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tiny_checkpoint(tmp_path, "gpt")
    docs = _jsonl(tmp_path / "valid.jsonl", [{"text": t} for t in DOCS])
    other = prepare(str(docs), tmp_path / "other", vocab_size=450, eval_fraction=0.5, **OPTIONS)
    assert eval_main(["--checkpoint", str(ckpt), "--task", "perplexity", "--data",
                      str(other.root), "--out", str(tmp_path / "r.json")]) == 2
    assert "was prepared with another tokenizer" in capsys.readouterr().err
