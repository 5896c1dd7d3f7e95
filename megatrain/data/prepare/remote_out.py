"""``megatrain-prepare --out URL``: the URL a prepare writes to, through a local staging folder.

The run works in ``$MEGATRAIN_CACHE/prepare-staging/<hash of the URL>`` and uploads each shard
once it is complete (deleting the local copy), then the journal; the tokenizer before any shard,
``manifest.json`` last. The journal at the URL is the truth: a rerun, on this machine or another,
downloads it and keeps the listed shards that the URL still holds with their sha256.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from megatrain.data import storage
from megatrain.data.manifest import MANIFEST, MAX_MANIFEST_BYTES, MAX_TOKENIZER_BYTES, SPLITS
from megatrain.data.prepare.journal import JOURNAL, JournalShard
from megatrain.data.tokenizer import HFTokenizer
from megatrain.data.tokenizer.hf_tokenizer import CONFIG_FILE as HF_CONFIG_FILE
from megatrain.errors import ConfigError, MegatrainError


def staging_dir(url: str) -> Path:
    """Where a prepare to ``url`` works before uploading: ``$MEGATRAIN_CACHE`` (else
    ``~/.cache/megatrain``) ``/prepare-staging/<hash of the URL>``."""
    cache = Path(os.environ.get("MEGATRAIN_CACHE") or Path.home() / ".cache" / "megatrain")
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return cache.expanduser() / "prepare-staging" / digest


class RemoteOut:
    """The URL a prepare writes to, through the local staging folder (see the module doc)."""

    def __init__(self, url: str) -> None:
        try:
            storage.check_no_credentials(url, "--out")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if url.startswith(storage.PIPE) or url.split("://", 1)[0] in ("http", "https"):
            raise ConfigError(f"--out {storage.redact(url)}: can't be written; give a folder "
                              "or the URL of a writable store (s3://bucket/prefix, gs://…)")
        self.url = url.rstrip("/")
        self.display = storage.redact(self.url)
        self.staging = staging_dir(self.url)
        try:  # an unknown protocol, or one whose package is missing, fails before any work
            self.fs, self.root = storage.filesystem(self.url)
        except (storage.StorageError, ValueError) as exc:
            raise ConfigError(f"--out {self.display}: {exc}") from exc

    def location(self, name: str) -> str:
        return storage.join(self.url, name)

    def start(self, journal: Path) -> None:
        """Remove the URL's manifest (the corpus there is no longer complete) and put the URL's
        journal, the truth about what is finished there, in the staging folder (or none)."""
        storage_call(lambda: storage.remove(self.location(MANIFEST)))
        data = self.read(JOURNAL, MAX_MANIFEST_BYTES)
        if data is None:
            journal.unlink(missing_ok=True)
        else:
            storage.write_bytes(str(journal), data)

    def read(self, name: str, limit: int | None) -> bytes | None:
        """The bytes of ``name`` at the URL; None if it is missing or holds more than
        ``limit`` bytes."""
        try:
            return storage.read_bytes(self.location(name), limit=limit or MAX_TOKENIZER_BYTES)
        except storage.StorageError as exc:
            if exc.__cause__ is None or isinstance(exc.__cause__, FileNotFoundError):
                return None  # no cause: more than ``limit`` bytes
            raise storage_error(exc) from exc

    def fetch_tokenizer(self, path: Path) -> bool:
        """The URL's tokenizer file (with a tokenizer.json's config) into ``path``'s folder;
        False if the URL has no such file."""
        names = [path.name] + ([HF_CONFIG_FILE] if path.name == HFTokenizer.file_name else [])
        for name in names:
            data = self.read(name, MAX_TOKENIZER_BYTES)
            if data is None and name == path.name:
                return False
            if data is not None:
                storage.write_bytes(str(path.parent / name), data)
        return True

    def upload(self, path: Path) -> None:
        storage_call(lambda: storage.upload(path, self.location(path.name)))

    def remove_unlisted(self, done: dict[str, list[JournalShard]]) -> None:
        """Remove shards at the URL that the journal does not keep (an earlier run's, or one
        uploaded just before an interruption and never journaled)."""
        keep = {s.info.name for shards in done.values() for s in shards}
        fs, root = self.fs, self.root
        fs.invalidate_cache(root)  # another process may have written there since
        for split in SPLITS:
            found = storage_call(lambda split=split: storage.with_retries(
                self.url, lambda: fs.glob(f"{root}/{split}-*.tar")))
            for name in sorted(p.rsplit("/", 1)[-1] for p in found):
                if name not in keep:
                    storage_call(lambda name=name: storage.remove(self.location(name)))


def storage_call(action: Callable[[], object]) -> object:
    """``action()``, a storage failure turned into a one-line error (:func:`storage_error`)."""
    try:
        return action()
    except storage.StorageError as exc:
        raise storage_error(exc) from exc


def storage_error(exc: storage.StorageError) -> MegatrainError:
    """A missing bucket or a refused write is a ConfigError (exit 2: don't retry); a store that
    stayed unreachable through the retries is a plain error (exit 1: try again later)."""
    if isinstance(exc.__cause__, (FileNotFoundError, PermissionError)):
        return ConfigError(str(exc))
    return MegatrainError(str(exc))
