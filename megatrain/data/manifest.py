"""``manifest.json``: the index of a prepared corpus (tokenizer, shards, statistics).

The manifest is written last and atomically by ``megatrain-prepare``, so its presence means the
shards it lists are complete. Readers rely on its per-shard sample counts to build a global
sample order without opening any shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatrain.errors import DataError

MANIFEST = "manifest.json"
FORMAT = 1
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: its file name, absolute path, sample and token counts, content hash and
    size in bytes (None in manifests written before sizes were recorded)."""

    name: str
    path: Path
    samples: int
    tokens: int
    sha256: str
    nbytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "samples": self.samples,
            "tokens": self.tokens,
            "sha256": self.sha256,
        }
        if self.nbytes is not None:
            data["bytes"] = self.nbytes
        return data

    @classmethod
    def from_json(cls, root: Path, data: dict[str, Any]) -> ShardInfo:
        size = data.get("bytes")
        return cls(
            data["name"], root / data["name"], int(data["samples"]), int(data["tokens"]),
            data["sha256"], None if size is None else int(size),
        )


@dataclass
class Manifest:
    """A prepared corpus folder, as described by its ``manifest.json``."""

    root: Path
    source: str
    seed: int
    tokenizer: dict[str, Any]
    splits: dict[str, list[ShardInfo]]
    stats: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    """How the corpus was prepared (cleaning, shard size, text field, tokenizer training)."""

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.tokenizer["file"]

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer["eos_id"])

    def shards(self, split: str) -> list[ShardInfo]:
        """The shards of ``split`` in manifest order; DataError for an unknown or empty split."""
        shards = self.splits.get(split)
        if not shards:
            known = ", ".join(s for s, v in self.splits.items() if v) or "none"
            raise DataError(
                f"{self.root} has no shards for split {split!r} (splits with data: {known})"
            )
        return shards

    def check_files(self) -> None:
        """DataError naming every listed shard (or the tokenizer) that is missing on disk."""
        listed = [self.tokenizer_path] + [s.path for shards in self.splits.values() for s in shards]
        missing = [p.name for p in listed if not p.is_file()]
        if missing:
            raise DataError(
                f"prepared corpus {self.root} is incomplete; missing: {', '.join(missing)}"
            )

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read a corpus folder or its ``manifest.json``; DataError naming ``path`` if it is not one."""
        path = Path(path)
        file = path if path.name == MANIFEST or path.is_file() else path / MANIFEST
        if not file.is_file():
            raise DataError(
                f"{path} is not a prepared corpus: no {MANIFEST} "
                f"(run megatrain-prepare --source SRC --out {path})"
            )
        try:
            data = json.loads(file.read_text())
            return cls._from_json(file.parent, data)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{file} is malformed ({exc!r}); prepare the corpus again") from exc

    @classmethod
    def _from_json(cls, root: Path, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT:
            raise ValueError(
                f"unsupported manifest format {data.get('format')!r}, expected {FORMAT}"
            )
        splits = {
            split: [ShardInfo.from_json(root, s) for s in data["splits"].get(split, [])]
            for split in SPLITS
        }
        tok = data["tokenizer"]
        missing = {"file", "vocab_size", "eos_id"} - set(tok)
        if missing:
            raise KeyError(f"tokenizer entry lacks {sorted(missing)}")
        return cls(
            root, data["source"], int(data["seed"]), tok, splits, data.get("stats", {}),
            data.get("options", {}),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "source": self.source,
            "seed": self.seed,
            "tokenizer": self.tokenizer,
            "splits": {
                split: [s.to_json() for s in shards] for split, shards in self.splits.items()
            },
            "stats": self.stats,
            "options": self.options,
        }

    def save(self) -> Path:
        """Write ``manifest.json`` atomically (tmp file + rename): readers never see half of one."""
        file = self.root / MANIFEST
        tmp = file.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, file)
        return file


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
