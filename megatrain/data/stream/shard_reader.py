"""Reading one shard with per-sample fault isolation, from local disk, a URL or a cache.

A shard is read whole into memory (a few MB) and walked header by header, so one bad part
costs only what it spoils: a corrupt member skips its sample, a truncated tar skips the samples
after the cut, an empty or unreadable file skips the shard. Token arrays are zero-copy views into
the shard's bytes. A task sample's extra members (``megatrain-prepare --format``: ``mask.npy``,
``target.npy``, ``cls``) are decoded into a per-sample dict and checked like its tokens (a bad one
skips the sample); a pretraining sample has none and costs three dictionary lookups. A shard at
a URL is fetched through ``megatrain.data.storage`` (bounded by its size in the manifest,
retried with backoff), checked against the manifest's sha256 and, with
``data.shard_cache_gb``, kept in a local cache (:class:`ShardCache`) for the next epoch or a
restarted job. A missing local shard is reported at start by ``Manifest.check_files``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import tokenize
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np

from megatrain.data import storage
from megatrain.data.manifest import MAX_SHARD_BYTES, ShardInfo
from megatrain.data.tar import npy_tokens, tar_samples

log = logging.getLogger("megatrain")

STALE_TMP_S = 3600
NPY_ERRORS = (ValueError, EOFError, SyntaxError, tokenize.TokenError)
"""What numpy raises for a cut or garbled ``.npy`` (a garbled header dict: TokenError)."""


Extra = dict[str, "np.ndarray | int"]
"""A task sample's extra members: ``mask`` (uint8, one per token), ``target`` (ids), ``cls`` (int)."""


@dataclass
class ShardRead:
    """A shard's token arrays by sample index (None: unreadable), the task samples' extra
    members (None: a pretraining sample) and what went wrong."""

    tokens: list[np.ndarray | None]
    keys: list[str]
    errors: list[str] = field(default_factory=list)
    extras: list[Extra | None] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return sum(t is None for t in self.tokens)


class ShardCache:
    """Shards fetched from a URL, kept on local disk under their sha256, at most ``max_bytes``
    in all, evicting the least recently used. A file appears under its name only once it is
    whole (written aside, then renamed), and is checked against its sha256 when read, so neither
    a half-written nor a damaged file is ever used. Ranks and loader workers may share one."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = Path(root), max_bytes

    def _file(self, sha256: str) -> Path:
        return self.root / f"{sha256}.tar"

    def get(self, sha256: str) -> bytes | None:
        path = self._file(sha256)
        try:
            data = path.read_bytes()
            os.utime(path)  # most recently used
        except OSError:  # absent, or evicted by another process meanwhile
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            path.unlink(missing_ok=True)
            return None
        return data

    def put(self, sha256: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{sha256}.{os.getpid()}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self._file(sha256))
        except OSError as exc:  # a full cache disk costs speed, never the run
            tmp.unlink(missing_ok=True)
            log.warning("shard cache %s: %s; not caching", self.root, exc)
            return
        self._evict()

    def _evict(self) -> None:
        entries = []
        for path in self.root.iterdir():
            try:
                stat = path.stat()
            except OSError:
                continue
            if path.suffix == ".tmp" and time.time() - stat.st_mtime > STALE_TMP_S:
                path.unlink(missing_ok=True)  # left by a process that died mid-write
            elif path.suffix == ".tar":
                entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


@dataclass(frozen=True)
class ShardIO:
    """How shards at URLs are fetched: retries with backoff, and the optional local cache."""

    retries: int = storage.DEFAULT_RETRIES
    backoff_s: float = storage.DEFAULT_BACKOFF_S
    cache_dir: str | None = None
    cache_bytes: int = 0

    def cache(self) -> ShardCache | None:
        if not self.cache_dir or self.cache_bytes <= 0:
            return None
        return ShardCache(Path(self.cache_dir), self.cache_bytes)

    def fetch(self, shard: ShardInfo) -> bytes:
        """The shard's bytes; StorageError (naming its URL) once retries are spent. A remote
        shard that does not match the manifest's sha256 is fetched again (a cut transfer); the
        second copy is used as it is and its faults isolated sample by sample."""
        limit = shard.nbytes if shard.nbytes is not None else MAX_SHARD_BYTES
        if not storage.is_url(shard.url):
            return storage.read_bytes(shard.url, limit=limit)
        cache = self.cache()
        data = cache.get(shard.sha256) if cache else None
        if data is not None:
            return data
        for attempt in range(2):
            data = storage.read_bytes(shard.url, limit=limit, retries=self.retries,
                                      backoff_s=self.backoff_s)
            if hashlib.sha256(data).hexdigest() == shard.sha256:
                if cache:
                    cache.put(shard.sha256, data)
                return data
            log.warning("data: %s does not match the sha256 in its manifest%s",
                        storage.redact(shard.url), "; fetching it again" if attempt == 0 else "")
        return data


DEFAULT_IO = ShardIO()


def parse_shard(data: bytes, expected: int, name: str) -> ShardRead:
    """Samples ``0..expected-1`` of a shard's bytes in tar order; a bad sample is None."""
    samples, stop = tar_samples(data)
    read = ShardRead([], [])
    if stop:
        read.errors.append(f"{name}: {stop}")
    for key, parts in samples[:expected]:
        read.keys.append(key)
        tokens = _sample_tokens(parts, f"{name}:{key}", read.errors)
        extra = None
        if tokens is not None and ("mask.npy" in parts or "target.npy" in parts or "cls" in parts):
            extra = _sample_extra(parts, len(tokens), f"{name}:{key}", read.errors)
            if extra is None:
                tokens = None
        read.tokens.append(tokens)
        read.extras.append(extra)
    read.keys += [f"{name}#{i}" for i in range(len(read.keys), expected)]
    read.tokens += [None] * (expected - len(read.tokens))
    read.extras += [None] * (expected - len(read.extras))
    return read


def _sample_tokens(parts: dict[str, memoryview], where: str, errors: list[str]) -> np.ndarray | None:
    if "tokens.npy" not in parts:
        errors.append(f"{where}: no tokens.npy member")
        return None
    try:
        return npy_tokens(parts["tokens.npy"])
    except NPY_ERRORS as exc:
        errors.append(f"{where}: {exc}")
        return None


def _sample_extra(parts: dict[str, memoryview], length: int, where: str,
                  errors: list[str]) -> Extra | None:
    """A task sample's extra members, decoded and checked; None (the reason in ``errors``) when
    one is corrupt: a mask that is not uint8 or not one per token, target ids that are not a
    token array, a class that is not a non-negative decimal."""
    extra: Extra = {}
    member = ""
    try:
        if "mask.npy" in parts:
            member = "mask.npy"
            mask = np.lib.format.read_array(BytesIO(parts[member]), allow_pickle=False)
            if mask.dtype != np.uint8 or mask.shape != (length,):
                raise ValueError(f"{mask.dtype}{list(mask.shape)}, expected uint8[{length}] "
                                 "(one per token)")
            extra["mask"] = mask
        if "target.npy" in parts:
            member = "target.npy"
            extra["target"] = npy_tokens(parts[member])
        if "cls" in parts:
            member, text = "cls", bytes(parts["cls"]).strip()
            if not text.isdigit():
                raise ValueError(f"{text[:20]!r} is not a class id (a non-negative integer)")
            extra["cls"] = int(text)
    except NPY_ERRORS as exc:
        errors.append(f"{where}.{member}: {exc}")
        return None
    return extra


def read_shard(shard: ShardInfo, io: ShardIO = DEFAULT_IO) -> ShardRead:
    """A shard's samples with faults isolated; a shard that cannot be fetched at all (after the
    retries) has every sample None, and the reason names its URL."""
    name, expected = shard.name, shard.samples
    try:
        data = io.fetch(shard)
    except OSError as exc:
        reason = str(exc) if isinstance(exc, storage.StorageError) else f"{shard.url}: {exc}"
        return ShardRead([None] * expected, [f"{name}#{i}" for i in range(expected)],
                         [f"{name}: {storage.redact(reason)}"], [None] * expected)
    read = parse_shard(data, expected, name)
    for error in read.errors:
        log.warning("data: %s", error)
    return read
