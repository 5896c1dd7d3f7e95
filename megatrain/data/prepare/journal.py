"""The prepare journal: which shards of an interrupted ``megatrain-prepare`` are finished.

``prepare-journal.jsonl`` sits in the output folder. Its first line fixes *what* is being
prepared: a fingerprint of the inputs (every resolved file with its size and mtime), of the
options that change the output, and of a given tokenizer. Each further line is appended and
fsync'ed right after an event is durable on disk: the trained tokenizer (its sha256), then each
shard once it has been renamed into place (split, name, counts, size, sha256, and how many routed
documents it accounts for). A rerun with the same fingerprint keeps each split's longest prefix
of listed shards whose file still has that size and sha256 and writes only what follows; a torn
last line (a kill mid-append) is ignored. A different fingerprint starts over.

The journal stays after a successful prepare, so rerunning a finished prepare only re-verifies.

For ``--out URL`` the journal is kept in the local staging folder and uploaded after every event
(each shard's upload first), so the copy at the URL only lists shards the URL holds; a rerun
starts from that copy (``remote_out.RemoteOut``), on the same machine or another.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatrain.data.manifest import SPLITS, ShardInfo

JOURNAL = "prepare-journal.jsonl"
FORMAT = 1


@dataclass
class JournalShard:
    """A finished shard and the number of routed documents it consumed (samples + empties)."""

    info: ShardInfo
    inputs: int


@dataclass
class Journal:
    """The finished work of the prepare whose output folder holds this journal."""

    path: Path
    fingerprint: str
    tokenizer: dict[str, Any] | None = None
    shards: dict[str, list[JournalShard]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    resumed: bool = False
    """True when this journal continues an earlier run with the same fingerprint."""

    @classmethod
    def open(cls, out: Path, fingerprint: str) -> Journal:
        """The folder's journal if it matches ``fingerprint``, else a new, empty one (written)."""
        path = Path(out) / JOURNAL
        journal = cls._read(path) if path.is_file() else None
        if journal is not None and journal.fingerprint == fingerprint:
            journal.resumed = True
            return journal
        fresh = cls(path, fingerprint)
        fresh.rewrite()
        return fresh

    @classmethod
    def _read(cls, path: Path) -> Journal | None:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                break  # a torn line: everything from here on is unwritten
        if not entries or entries[0].get("journal") != FORMAT:
            return None
        journal = cls(path, str(entries[0].get("fingerprint")))
        for entry in entries[1:]:
            journal._apply(entry)
        return journal

    def _apply(self, entry: dict[str, Any]) -> None:
        if "tokenizer" in entry:
            self.tokenizer = entry["tokenizer"]
        elif "shard" in entry:
            data = entry["shard"]
            info = ShardInfo.from_json(self.path.parent, data)
            self.shards[data["split"]].append(JournalShard(info, int(data["inputs"])))

    def set_tokenizer(self, entry: dict[str, Any]) -> None:
        """Record the tokenizer; a different one than before invalidates every shard."""
        if self.tokenizer != entry:
            self.tokenizer = entry
            self.shards = {s: [] for s in SPLITS}
            self.rewrite()

    def add_shard(self, split: str, info: ShardInfo, inputs: int) -> None:
        """Record a shard whose file is complete and in place."""
        self.shards[split].append(JournalShard(info, inputs))
        self._append({"shard": {"split": split, "inputs": inputs, **info.to_json()}})

    def keep(self, shards: dict[str, list[JournalShard]]) -> None:
        """Forget every shard not in ``shards`` (those failed verification)."""
        if shards != self.shards:
            self.shards = shards
            self.rewrite()

    def rewrite(self) -> None:
        """Write the whole journal atomically (tmp file + rename)."""
        lines = [{"journal": FORMAT, "fingerprint": self.fingerprint}]
        if self.tokenizer is not None:
            lines.append({"tokenizer": self.tokenizer})
        for split, shards in self.shards.items():
            lines += [
                {"shard": {"split": split, "inputs": s.inputs, **s.info.to_json()}} for s in shards
            ]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(line, sort_keys=True) + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _append(self, entry: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
