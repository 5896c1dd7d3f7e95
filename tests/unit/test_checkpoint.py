"""Checkpoint bookkeeping that needs no engine: retention, ``latest``, path resolution."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatrain.data.tokenizer import HFTokenizer, load_tokenizer
from megatrain.errors import ConfigError
from megatrain.training.checkpoint import (
    CheckpointError,
    find_checkpoint,
    prune,
    resolve_checkpoint_path,
    save_checkpoint,
    verify_checkpoint,
    write_manifest,
)


def _fake_checkpoints(root: Path, steps: list[int]) -> None:
    root.mkdir(parents=True)
    for step in steps:
        (root / f"step_{step}").mkdir()
        (root / f"step_{step}" / "meta.json").write_text(json.dumps({"step": step}))
        torch.save({"w": torch.arange(256, dtype=torch.uint8).repeat(4)},
                   root / f"step_{step}" / "weights.pt")
        write_manifest(root / f"step_{step}")


def test_prune_keeps_the_newest_and_drops_partial_saves(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _fake_checkpoints(root, [10, 20, 30, 100])
    (root / "step_110.tmp").mkdir()
    prune(root, keep_last=2, keep="step_100")
    assert sorted(p.name for p in root.iterdir()) == ["step_100", "step_30"]
    prune(root, keep_last=0, keep="step_100")  # keep_last below 1 still keeps the newest
    assert sorted(p.name for p in root.iterdir()) == ["step_100"]


def test_find_checkpoint_follows_latest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert find_checkpoint(run, "auto") is None
    _fake_checkpoints(run / "checkpoints", [5, 7])
    (run / "checkpoints" / "latest").write_text("step_5")
    assert find_checkpoint(run, "auto") == run / "checkpoints" / "step_5"
    assert find_checkpoint(run, "never") is None
    assert find_checkpoint(run, str(run / "checkpoints" / "step_7")).name == "step_7"
    assert resolve_checkpoint_path(run).name == "step_5"


def test_a_folder_that_is_no_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path)):
        resolve_checkpoint_path(tmp_path)


def _flip_byte(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, problem", [
    (lambda c: _flip_byte(c / "weights.pt"), "weights.pt does not match its sha256"),
    (lambda c: (c / "weights.pt").write_bytes(b"short"), "weights.pt has 5 bytes"),
    (lambda c: (c / "meta.json").unlink(), "meta.json is missing"),
    (lambda c: (c / "MANIFEST.json").unlink(), "MANIFEST.json is missing"),
])
def test_verify_names_what_is_wrong(tmp_path: Path, damage, problem: str) -> None:
    _fake_checkpoints(tmp_path / "c", [1])
    ckpt = tmp_path / "c" / "step_1"
    assert verify_checkpoint(ckpt) is None
    damage(ckpt)
    assert problem in verify_checkpoint(ckpt)


def test_auto_resume_falls_back_to_the_newest_valid_checkpoint(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    _fake_checkpoints(run / "checkpoints", [5, 10, 15])
    (run / "checkpoints" / "latest").write_text("step_15")
    _flip_byte(run / "checkpoints" / "step_15" / "weights.pt")
    (run / "checkpoints" / "step_10" / "meta.json").unlink()
    with caplog.at_level("WARNING", logger="megatrain"):
        assert find_checkpoint(run, "auto") == run / "checkpoints" / "step_5"
    assert "step_15 is not usable (weights.pt does not match its sha256)" in caplog.text
    assert "step_10 is not usable (meta.json is missing)" in caplog.text
    with pytest.raises(CheckpointError, match="step_15 is corrupt: weights.pt does not match"):
        find_checkpoint(run, str(run / "checkpoints" / "step_15"))
    _flip_byte(run / "checkpoints" / "step_5" / "weights.pt")
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies"):
        find_checkpoint(run, "auto")


class _Engine:
    """What ``save_checkpoint`` asks of DeepSpeed's engine, on one process."""

    device = torch.device("cpu")

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        (Path(root) / tag).mkdir(parents=True)
        torch.save({"w": torch.arange(4.0)}, Path(root) / tag / "model_states.pt")


def _word_level_tokenizer_json(folder: Path) -> Path:
    """A tiny Hugging Face tokenizer.json, with a tokenizer_config.json naming its eos."""
    tokenizers = pytest.importorskip("tokenizers")
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<|end|>": 1, "to": 2, "be": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<|end|>"}')
    return folder / "tokenizer.json"


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_a_checkpoint_keeps_its_tokenizer_and_a_tokenizer_json_its_roles(
        tmp_path: Path, kind: str, tokenizer_model: Path) -> None:
    """A checkpoint holds the corpus tokenizer under its own kind's name; the roles of a Hugging
    Face tokenizer live in tokenizer_config.json beside it: the checkpoint keeps that too, so
    export and generate read the roles training used."""
    corpus = tmp_path / "corpus"
    if kind == "tokenizer.json":
        tokenizer = _word_level_tokenizer_json(corpus)
    else:
        corpus.mkdir()
        tokenizer = Path(shutil.copyfile(tokenizer_model, corpus / "tokenizer.model"))
        (corpus / "tokenizer_config.json").write_text('{"eos_token": "<|end|>"}')  # not its own
    ckpt = save_checkpoint(_Engine(), tmp_path / "checkpoints", 3, 0, {}, {"step": 3},
                           load_tokenizer(tokenizer), keep_last=2)
    assert (ckpt / kind.replace("sentencepiece", "tokenizer.model")).read_bytes() == \
        tokenizer.read_bytes()
    assert (ckpt / "tokenizer_config.json").exists() == (kind == "tokenizer.json")
    assert verify_checkpoint(ckpt) is None  # the manifest covers it
    loaded = load_tokenizer(ckpt)
    assert (loaded.path.name, loaded.eos_id) == (tokenizer.name, load_tokenizer(tokenizer).eos_id)


def test_a_checkpoint_from_before_tokenizers_kept_their_names_still_loads(tmp_path: Path) -> None:
    """Checkpoints written before 2026-12 hold a tokenizer.json as ``tokenizer.model``: the
    loader reads the content, not the name, and finds its roles beside it."""
    given = _word_level_tokenizer_json(tmp_path / "given")
    old = tmp_path / "step_7"
    old.mkdir()
    shutil.copyfile(given, old / "tokenizer.model")
    shutil.copyfile(given.parent / "tokenizer_config.json", old / "tokenizer_config.json")
    loaded = load_tokenizer(old)
    assert isinstance(loaded, HFTokenizer) and loaded.path.name == "tokenizer.model"
    assert (loaded.eos_id, loaded.encode("to be")) == (1, [2, 3])


def test_prune_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    from megatrain.training.best import BestTracker

    root = tmp_path / "checkpoints"
    _fake_checkpoints(root, [10, 20, 30])
    best = BestTracker.load(root, "eval_accuracy", ["eval_loss", "eval_accuracy"])
    best.mark({"eval_accuracy": 0.9}, 10, write=True)
    prune(root, keep_last=1, keep="step_30")
    assert sorted(p.name for p in root.glob("step_*")) == ["step_10", "step_30"]
    again = BestTracker.load(root, "eval_accuracy", ["eval_loss", "eval_accuracy"])
    assert (again.step, again.value) == (10, 0.9)
    assert not again.improves({"eval_accuracy": 0.8}) and again.improves({"eval_accuracy": 0.95})
    by_loss = BestTracker.load(root, "eval_loss", ["eval_loss", "eval_accuracy"])
    assert by_loss.step is None  # a record of another metric starts afresh
    by_loss.mark({"eval_loss": 2.0}, 20, write=False)
    assert by_loss.improves({"eval_loss": 1.5}) and not by_loss.improves({"eval_loss": 2.5})


def test_keep_best_must_name_a_metric_of_the_run(tmp_path: Path) -> None:
    from megatrain.training.best import BestTracker

    with pytest.raises(ConfigError, match="trainer.keep_best=eval_acc: not an eval metric.*"
                                          "eval_loss, eval_ppl"):
        BestTracker.load(tmp_path, "eval_acc", ["eval_loss", "eval_ppl"])
