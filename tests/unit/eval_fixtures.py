"""Tiny random checkpoints (a real tokenizer, random weights) for the megatrain-eval tests."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

from megatrain.data.prepare.train_tokenizer import train_tokenizer
from megatrain.models.registry import MODEL_SPECS, resolve_model_config, with_heads
from megatrain.training.checkpoint import write_manifest
from tests.unit.checkpoints import write_stage0_checkpoint

DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 2,
    "Short one.",
    "我爱北京天安门，天安门上太阳升。" * 3,
]
CORPUS = "\n".join(DOCS) + Path(json.__file__).read_text()[:6000]
VOCAB = 512
DIMS = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_ff": 64, "max_seq_len": 32}


@functools.cache
def _trained_tokenizer() -> Path:
    """Trained once per test process (a few seconds), copied into each checkpoint."""
    folder = Path(tempfile.mkdtemp(prefix="megatrain-eval-tok-"))
    atexit.register(shutil.rmtree, folder, True)
    return train_tokenizer([CORPUS], folder / "tokenizer.model", VOCAB)


def tiny_checkpoint(root: Path, family: str, *, num_labels: int = 0, seed: int = 0,
                    labels: list[str] | None = None) -> Path:
    """``root/<family>/ckpt``: a stage-0 checkpoint of a tiny random ``family`` model."""
    spec = MODEL_SPECS[family]
    size = min(spec.sizes, key=lambda s: spec.sizes[s]["n_layers"] * spec.sizes[s]["d_model"])
    config = resolve_model_config({"family": family, "size": size, **DIMS}, VOCAB)
    if num_labels:
        config = with_heads(config, num_labels=num_labels)
    torch.manual_seed(seed)
    model = spec.build(config, "cpu", torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = write_stage0_checkpoint(root / family / "ckpt", family, model, _trained_tokenizer())
    if labels is not None:
        meta = json.loads((ckpt / "meta.json").read_text())
        (ckpt / "meta.json").write_text(json.dumps(meta | {"labels": labels}))
        write_manifest(ckpt)  # as the trainer does: meta.json is part of it
    return ckpt
