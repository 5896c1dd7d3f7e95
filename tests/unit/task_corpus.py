"""Tiny task corpora (``--format sft|cls|seq2seq`` layout) for stream tests, written with the
shard writer's own tar (``ShardTar``, ``npy_bytes``) and a manifest with the ``task`` dict.

Ids: EOS 2, pad 3, [CLS] 4, [SEP] 5; ordinary tokens from 10 on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from megatrain.data.manifest import MANIFEST, Manifest, ShardInfo
from megatrain.data.prepare.shard_writer import ShardTar, npy_bytes, shard_name

EOS, PAD, CLS, SEP = 2, 3, 4, 5
VOCAB = 64
TOKENIZER = SimpleNamespace(path="tokenizer.model", vocab_size=VOCAB, eos_id=EOS, pad_id=PAD,
                            cls_id=CLS, sep_id=SEP, unk_id=0, bos_id=1, mask_id=6,
                            sentinel_ids=[])


@dataclass
class Row:
    """One task sample: its tokens and extra members (``mask`` uint8, ``target`` ids, ``cls``)."""

    key: str
    tokens: Sequence[int]
    mask: Sequence[int] | None = None
    target: Sequence[int] | None = None
    cls: int | None = None
    raw: dict[str, bytes] = field(default_factory=dict)  # members written as they are

    def members(self) -> list[tuple[str, bytes]]:
        out = [("json", b"{}"), ("tokens.npy", npy_bytes(np.asarray(self.tokens, np.uint16)))]
        if self.mask is not None:
            out.append(("mask.npy", npy_bytes(np.asarray(self.mask, np.uint8))))
        if self.target is not None:
            out.append(("target.npy", npy_bytes(np.asarray(self.target, np.uint16))))
        if self.cls is not None:
            out.append(("cls", str(self.cls).encode()))
        return out + list(self.raw.items())


def write_shard(path: Path, rows: Sequence[Row]) -> ShardInfo:
    tar = ShardTar(path)
    for row in rows:
        for ext, data in row.members():
            tar.add(f"{row.key}.{ext}", data)
    sha, size = tar.close()
    return ShardInfo(path.name, str(path), len(rows), sum(len(r.tokens) for r in rows), sha, size)


def write_task_corpus(root: Path, fmt: str | None, rows: Sequence[Row], *, shards: int = 3,
                      labels: Sequence[str] = (), eval_rows: Sequence[Row] = ()) -> Manifest:
    """A prepared task corpus of ``rows`` over ``shards`` train shards (``fmt`` None: no task
    dict, as a pretraining manifest)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(b"fake")
    splits: dict[str, list[ShardInfo]] = {"train": [], "eval": []}
    for i, part in enumerate(np.array_split(np.arange(len(rows)), shards)):
        path = root / shard_name("train", i)
        splits["train"].append(write_shard(path, [rows[k] for k in part]))
    if eval_rows:
        splits["eval"].append(write_shard(root / shard_name("eval", 0), eval_rows))
    tokenizer = {"file": "tokenizer.model", "sha256": "fake", "vocab_size": VOCAB,
                 "eos_id": EOS, "pad_id": PAD}
    data = Manifest(root, "synthetic", 0, tokenizer, splits).to_json()
    if fmt is not None:
        data["task"] = {"format": fmt, "template": None, "labels": list(labels), "dropped": 0}
    (root / MANIFEST).write_text(json.dumps(data, indent=2))
    return Manifest.load(root)


def sft_rows(count: int, *, seed: int = 0, lengths: tuple[int, int] = (3, 14)) -> list[Row]:
    """Prompt/completion rows: a random prompt (mask 0) then a completion (mask 1); every few a
    two-turn chat (mask 0, 1, 0, 2)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(count):
        n = int(rng.integers(*lengths))
        tokens = rng.integers(10, VOCAB, n)
        cut = int(rng.integers(1, n))
        mask = np.r_[np.zeros(cut, int), np.ones(n - cut, int)]
        if k % 4 == 3 and n >= 4:  # chat: user, assistant 1, user, assistant 2
            mask = np.r_[0, np.ones(n // 2 - 1, int), 0, np.full(n - n // 2 - 1, 2)]
        rows.append(Row(f"s-{k}", tokens.tolist(), mask.tolist()))
    return rows


def cls_rows(count: int, *, seed: int = 0, labels: int = 3) -> list[Row]:
    """Single texts and pairs ([CLS] a [SEP] (b [SEP])) with labels 0..labels-1."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(count):
        a = rng.integers(10, VOCAB, int(rng.integers(1, 12))).tolist()
        tokens = [CLS, *a, SEP]
        if k % 2:
            tokens += [*rng.integers(10, VOCAB, int(rng.integers(1, 12))).tolist(), SEP]
        rows.append(Row(f"c-{k}", tokens, cls=k % labels))
    return rows


def seq2seq_rows(count: int, *, seed: int = 0) -> list[Row]:
    rng = np.random.default_rng(seed)
    return [Row(f"t-{k}", rng.integers(10, VOCAB, int(rng.integers(1, 15))).tolist(),
                target=rng.integers(10, VOCAB, int(rng.integers(1, 9))).tolist())
            for k in range(count)]
