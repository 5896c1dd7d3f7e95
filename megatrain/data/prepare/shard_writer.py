"""Writing and reading tokenized tar shards (the WebDataset layout of DESIGN.md).

A shard is a POSIX (ustar) tar; each sample is ``<key>.json`` then ``<key>.tokens.npy``, then the
extra members of task data (``<key>.mask.npy``, ``<key>.cls`` or ``<key>.target.npy``). Every
member header is fixed (mtime 0, uid/gid 0, no user or group names, mode 0444), so the bytes of a
shard depend on its samples only: same inputs, seed and tokenizer give byte-identical shards. A
shard is written to ``<name>.tmp``, hashed while it is written, fsync'ed, then renamed into place:
a file under a shard's name is always complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from megatrain.data.manifest import ShardInfo
from megatrain.data.tar import npy_tokens, tar_samples
from megatrain.errors import DataError

TMP_SUFFIX = ".tmp"


class Encoded(NamedTuple):
    """A tokenized document bound for ``split``; ``members``: the (extension, bytes) written after
    its tokens (a task sample's ``mask.npy``, ``cls`` or ``target.npy``)."""

    split: str
    key: str
    source: str
    nbytes: int
    tokens: np.ndarray
    members: tuple[tuple[str, bytes], ...] = ()


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The smallest dtype the shards use for ids below ``vocab_size``."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` in ``.npy`` format (what ``np.load`` reads)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class ShardTar:
    """One shard being written: fixed member headers, sha256 and size kept as bytes go out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + TMP_SUFFIX)
        self.size = 0
        self._sha = hashlib.sha256()
        self._file = self.tmp.open("wb")

    def add(self, name: str, data: bytes) -> None:
        """Append a member: its ustar header, its bytes, zero padding to a 512-byte block. (The
        bytes ``tarfile.addfile`` writes, without its per-member copies and Python I/O loop.)"""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        self._write(b"".join((header, data, bytes(-len(data) % tarfile.BLOCKSIZE))))

    def _write(self, data: bytes) -> None:
        self._sha.update(data)
        self.size += len(data)
        self._file.write(data)

    def close(self) -> tuple[str, int]:
        """Finish the archive, make it durable and move it into place; (sha256, size)."""
        end = self.size + 2 * tarfile.BLOCKSIZE  # two zero blocks, then pad to a whole record
        self._write(bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return self._sha.hexdigest(), self.size


@dataclass(frozen=True)
class ShardLimit:
    """A shard is closed once it holds ``tokens`` tokens, or ``nbytes`` bytes when that is set."""

    tokens: int | None = None
    nbytes: int | None = None

    def full(self, tokens: int, nbytes: int) -> bool:
        if self.nbytes is not None:
            return nbytes >= self.nbytes
        return tokens >= (self.tokens or 0)


ShardDone = Callable[[str, ShardInfo, int], None]
"""Called with (split, shard, routed documents it consumed) once a shard is in place."""


class ShardWriter:
    """Writes one split's samples to ``<split>-NNNNNN.tar``, rolling over at the limit.

    It starts after the shards in ``done`` (finished by an earlier, interrupted run).
    """

    def __init__(
        self, out: Path, split: str, limit: ShardLimit, done: list[ShardInfo], on_done: ShardDone
    ) -> None:
        self.out, self.split, self.limit, self.on_done = out, split, limit, on_done
        self.shards = list(done)
        self._tar: ShardTar | None = None
        self._samples = self._tokens = self._inputs = 0

    def skip(self) -> None:
        """Count a routed document that has no tokens (it is not written)."""
        self._inputs += 1

    def write(self, doc: Encoded) -> None:
        if self._tar is None:
            self._tar = ShardTar(self.out / shard_name(self.split, len(self.shards)))
        meta = json.dumps({"source": doc.source, "bytes": doc.nbytes}, sort_keys=True)
        self._tar.add(f"{doc.key}.json", meta.encode())
        self._tar.add(f"{doc.key}.tokens.npy", npy_bytes(doc.tokens))
        for extension, data in doc.members:
            self._tar.add(f"{doc.key}.{extension}", data)
        self._samples += 1
        self._inputs += 1
        self._tokens += len(doc.tokens)
        if self.limit.full(self._tokens, self._tar.size):
            self._close_shard()

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def _close_shard(self) -> None:
        sha, size = self._tar.close()
        path = self._tar.path
        info = ShardInfo(path.name, str(path), self._samples, self._tokens, sha, size)
        self.shards.append(info)
        self.on_done(self.split, info, self._inputs)
        self._tar = None
        self._samples = self._tokens = self._inputs = 0


def shard_token_counts(path: Path, vocab_size: int) -> np.ndarray:
    """How often each id occurs in a shard (to rebuild statistics on resume); DataError naming
    the shard if it does not read cleanly."""
    return token_counts(path.read_bytes(), path.name, vocab_size)


def token_counts(data: bytes, name: str, vocab_size: int) -> np.ndarray:
    """:func:`shard_token_counts` of a shard's bytes ``data``, named ``name`` in errors."""
    samples, stop = tar_samples(data)
    if stop:
        raise DataError(f"{name}: unreadable tar ({stop})")
    counts = np.zeros(vocab_size, dtype=np.int64)
    for key, parts in samples:
        try:
            tokens = npy_tokens(parts["tokens.npy"])
        except (KeyError, ValueError) as exc:
            raise DataError(f"{name}:{key}: unreadable tokens.npy ({exc!r})") from exc
        counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
    return counts
