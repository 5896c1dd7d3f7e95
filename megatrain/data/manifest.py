"""``manifest.json``: the index of a prepared corpus (tokenizer, shards, statistics).

The manifest is written last and atomically by ``megatrain-prepare``, so its presence means the
shards it lists are complete. Readers rely on its per-shard sample counts to build a global
sample order without opening any shard. A corpus folder may be a local path or a URL
(``megatrain.data.storage``); names in a manifest are plain file names, never paths, so a
manifest can't point a reader (or a writer) outside its folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatrain.data import storage
from megatrain.data.tokenizer.hf_tokenizer import CONFIG_FILE as HF_TOKENIZER_CONFIG
from megatrain.errors import DataError

MANIFEST = "manifest.json"
FORMAT = 1
SPLITS = ("train", "eval")
MAX_MANIFEST_BYTES = 256 << 20
MAX_TOKENIZER_BYTES = 512 << 20
MAX_SHARD_BYTES = 8 << 30
"""The most a shard whose size the manifest doesn't record (older manifests) is read to."""
TASK_FORMATS = ("sft", "cls", "seq2seq")
"""Formats of task data (a manifest's ``task["format"]``); pretraining corpora have no task."""
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def safe_name(name: object, what: str) -> str:
    """``name`` if it is a plain file name (no folder, no ``..``, nothing hidden); ValueError
    otherwise."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{what} name {name!r} is not a plain file name")
    return name


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: its file name, location (a path or URL), sample and token counts, content
    hash and size in bytes (None in manifests written before sizes were recorded)."""

    name: str
    url: str
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

    @property
    def path(self) -> Path:
        """The shard's local path (for a corpus on local disk)."""
        return storage.local_path(self.url)

    @classmethod
    def from_json(cls, root: str | Path, data: dict[str, Any]) -> ShardInfo:
        name, size = safe_name(data["name"], "shard"), data.get("bytes")
        return cls(
            name, storage.join(str(root), name), int(data["samples"]), int(data["tokens"]),
            str(data["sha256"]), None if size is None else int(size),
        )


@dataclass
class Manifest:
    """A prepared corpus folder (a path or URL), as described by its ``manifest.json``."""

    root: str
    source: str
    seed: int
    tokenizer: dict[str, Any]
    splits: dict[str, list[ShardInfo]]
    stats: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    """How the corpus was prepared (cleaning, shard size, text field, tokenizer training)."""
    local_tokenizer_dir: Path | None = None
    """Where the tokenizer of a corpus at a URL was copied (:meth:`fetch_tokenizer`)."""
    task: dict[str, Any] | None = None
    """Task data (``megatrain-prepare --format``): ``{"format": "sft"|"cls"|"seq2seq",
    "template": name or None, "labels": [...] (cls only; index = label id), "dropped": rows
    dropped at prepare time}``; None for a pretraining corpus."""

    def __post_init__(self) -> None:
        self.root = str(self.root)  # a Path from prepare, or a URL

    @property
    def is_remote(self) -> bool:
        return storage.is_url(self.root)

    @property
    def name(self) -> str:
        """The folder's last component (before a ``pipe:`` command's ``{}``): a source's
        default name."""
        return self.root.split("{}", 1)[0].rstrip("/").rsplit("/", 1)[-1]

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer file on local disk (for a corpus at a URL, after :meth:`fetch_tokenizer`)."""
        if self.local_tokenizer_dir is not None:
            return self.local_tokenizer_dir / self.tokenizer["file"]
        if self.is_remote:
            raise DataError(f"{storage.redact(self.root)}: the tokenizer has not been fetched")
        return storage.local_path(self.root) / self.tokenizer["file"]

    def fetch_tokenizer(self, cache: Path) -> Path:
        """Copy the tokenizer of a corpus at a URL (with the HF tokenizer's config, if present)
        into ``cache``, checked against the manifest's sha256; its local path."""
        digest = self.tokenizer.get("sha256") or hashlib.sha256(self.root.encode()).hexdigest()
        folder = cache / "tokenizers" / digest[:32]
        target = folder / self.tokenizer["file"]
        if not target.is_file():
            data = _read(storage.join(self.root, self.tokenizer["file"]), MAX_TOKENIZER_BYTES)
            if self.tokenizer.get("sha256") and hashlib.sha256(data).hexdigest() != digest:
                raise DataError(f"{storage.redact(self.root)}: {self.tokenizer['file']} does not "
                                "match the sha256 in its manifest")
            companion = storage.join(self.root, HF_TOKENIZER_CONFIG)
            if self.tokenizer["file"].endswith(".json") and storage.exists(companion):
                storage.write_bytes(str(folder / HF_TOKENIZER_CONFIG),
                                    _read(companion, MAX_MANIFEST_BYTES))
            storage.write_bytes(str(target), data)
        self.local_tokenizer_dir = folder
        return target

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
        """DataError naming every listed shard (or the tokenizer) that is missing on disk. A
        corpus at a URL is checked as it streams (a missing shard fails at once, naming it)."""
        if self.is_remote:
            return
        listed = [self.tokenizer_path] + [s.path for shards in self.splits.values() for s in shards]
        missing = [p.name for p in listed if not p.is_file()]
        if missing:
            raise DataError(
                f"prepared corpus {self.root} is incomplete; missing: {', '.join(missing)}"
            )

    @classmethod
    def load(cls, location: str | Path) -> Manifest:
        """Read a corpus folder (a path or URL) or its ``manifest.json``; DataError naming
        ``location`` if it is not one."""
        location = str(location)
        if not storage.is_url(location) and Path(location).is_file():
            location = str(Path(location).parent)
        root = location.removesuffix("/" + MANIFEST).removesuffix(MANIFEST) or "."
        file = storage.join(root, MANIFEST)
        if not storage.is_url(root) and not Path(file).is_file():
            raise DataError(
                f"{location} is not a prepared corpus: no {MANIFEST} "
                f"(run megatrain-prepare --source SRC --out {location})"
            )
        text = _read(file, MAX_MANIFEST_BYTES)
        try:
            return cls._from_json(root, json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{storage.redact(file)} is malformed ({exc!r}); prepare the corpus "
                            "again") from exc

    @classmethod
    def _from_json(cls, root: str, data: dict[str, Any]) -> Manifest:
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
        safe_name(tok["file"], "tokenizer")
        return cls(
            root, data["source"], int(data["seed"]), tok, splits, data.get("stats", {}),
            data.get("options", {}), task=_task_entry(data.get("task")),
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
        } | ({} if self.task is None else {"task": self.task})

    def save(self) -> str:
        """Write ``manifest.json`` whole (a local tmp file + rename, or one PUT): readers never
        see half of one. Returns its location."""
        file = storage.join(self.root, MANIFEST)
        storage.write_bytes(file, (json.dumps(self.to_json(), indent=2) + "\n").encode())
        return file


def _task_entry(task: Any) -> dict[str, Any] | None:
    """A manifest's ``task`` entry, checked (ValueError: the manifest is malformed)."""
    if task is None:
        return None
    if not isinstance(task, dict) or task.get("format") not in TASK_FORMATS:
        raise ValueError(f"task entry {task!r} has no format among {', '.join(TASK_FORMATS)}")
    labels = task.get("labels")
    if task["format"] == "cls" and (
        not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels)
    ):
        raise ValueError(f"a cls task entry needs a list of label strings, got {labels!r}")
    return task


def _read(location: str, limit: int) -> bytes:
    """A manifest's or tokenizer's bytes; DataError naming the location if it can't be read."""
    try:
        return storage.read_bytes(location, limit=limit)
    except OSError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise DataError(f"{storage.redact(location)} does not exist (is the URL that of a "
                            "folder that megatrain-prepare wrote?)") from exc
        raise DataError(str(exc) if isinstance(exc, storage.StorageError)
                        else f"{location}: {exc}") from exc


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
