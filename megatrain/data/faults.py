"""Reading one shard with per-sample fault isolation, and retrying remote shards.

A shard is read whole into memory (a few MB) and walked header by header, so one bad part
costs only what it spoils: a corrupt member skips its sample, a truncated tar skips the samples
after the cut, an empty or unreadable file skips the shard. Token arrays are zero-copy views into
the shard's bytes. Remote shards (``http(s)://``, ``pipe:``) are fetched through webdataset's
``gopen`` and retried with exponential backoff; a local file is not retried (a missing local
shard is reported at start by ``Manifest.check_files``).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("megatrain")

REMOTE_PREFIXES = ("http://", "https://", "pipe:")
TOKEN_DTYPES = (np.dtype("<u2"), np.dtype("<u4"))
BLOCK = 512


@dataclass
class ShardRead:
    """A shard's token arrays by sample index (None: unreadable) and what went wrong."""

    tokens: list[np.ndarray | None]
    keys: list[str]
    errors: list[str] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return sum(t is None for t in self.tokens)


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def fetch(url: str, *, retries: int = 3, backoff_s: float = 1.0,
          sleep: Callable[[float], None] = time.sleep) -> bytes:
    """The bytes of a shard; remote ones retried ``retries`` times, waiting backoff·2^k between."""
    if not is_remote(url):
        return Path(url).read_bytes()
    from webdataset.gopen import gopen

    for attempt in range(retries + 1):
        try:
            stream = gopen(url, "rb")
            try:
                data = stream.read()
            finally:
                stream.close()  # a pipe's non-zero exit status raises here
            return data
        except Exception as exc:  # any transport failure is retried the same way
            if attempt == retries:
                raise OSError(f"{url}: failed after {retries + 1} attempts ({exc})") from exc
            wait = backoff_s * 2**attempt
            log.warning("shard %s: %s; retrying in %.1fs", url, exc, wait)
            sleep(wait)
    raise AssertionError("unreachable")


def _octal(field_bytes: bytes) -> int:
    text = field_bytes.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _octal(header[148:156])
    except ValueError:
        return False
    return stored == sum(header[:148]) + 256 + sum(header[156:])


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").splitlines():
        _, _, kv = record.partition(" ")
        if kv.startswith("path="):
            return kv[5:]
    return None


def tar_members(data: bytes) -> tuple[list[tuple[str, memoryview]], str | None]:
    """``(name, bytes)`` of each regular file in tar order, and why the walk stopped early (None
    at a clean end). Handles ustar prefixes, GNU long names and pax paths."""
    view, pos, members, long_name = memoryview(data), 0, [], None
    while pos + BLOCK <= len(data):
        header = data[pos : pos + BLOCK]
        if header.count(0) == BLOCK:
            return members, None
        if not _checksum_ok(header):
            return members, f"bad tar header at byte {pos}"
        size, kind = _octal(header[124:136]), header[156:157]
        body_at = pos + BLOCK
        pos = body_at + (size + BLOCK - 1) // BLOCK * BLOCK
        if body_at + size > len(data):
            return members, f"truncated at byte {len(data)} (member needs {body_at + size})"
        body = view[body_at : body_at + size]
        if kind in (b"L", b"x"):
            long_name = (bytes(body).rstrip(b"\0").decode("utf-8", "replace") if kind == b"L"
                         else _pax_path(bytes(body)))
            continue
        name = long_name or _ustar_name(header)
        long_name = None
        if kind in (b"0", b"\0"):
            members.append((name, body))
    if not data:
        return members, "empty file"
    return members, "truncated (a partial block at the end)" if pos != len(data) else None


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix:
            name = f"{prefix}/{name}"
    return name


def split_name(name: str) -> tuple[str, str]:
    """webdataset's (key, extension): the extension starts at the basename's first dot."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def npy_tokens(data: memoryview) -> np.ndarray:
    """A 1-d little-endian uint16/uint32 ``.npy`` as a zero-copy view; ValueError otherwise."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
    shape, _fortran, dtype = reader(f)
    if len(shape) != 1 or dtype not in TOKEN_DTYPES:
        raise ValueError(f"tokens are {dtype}{list(shape)}, expected 1-d uint16/uint32")
    start = f.tell()
    if len(data) - start != shape[0] * dtype.itemsize:
        raise ValueError(f"tokens.npy holds {len(data) - start} bytes, its header says "
                         f"{shape[0] * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype, count=shape[0], offset=start)


def parse_shard(data: bytes, expected: int, name: str) -> ShardRead:
    """Samples ``0..expected-1`` of a shard's bytes in tar order; a bad sample is None."""
    members, stop = tar_members(data)
    read = ShardRead([], [])
    if stop:
        read.errors.append(f"{name}: {stop}")
    key, parts = None, {}
    for member, body in [*members, ("", memoryview(b""))]:
        member_key, ext = split_name(member)
        if key is not None and member_key != key:
            read.keys.append(key)
            read.tokens.append(_sample_tokens(parts, f"{name}:{key}", read.errors))
            parts = {}
        key = member_key
        parts[ext] = body
    del read.keys[expected:], read.tokens[expected:]
    missing = expected - len(read.tokens)
    read.keys += [f"{name}#{i}" for i in range(len(read.keys), expected)]
    read.tokens += [None] * missing
    return read


def _sample_tokens(parts: dict[str, memoryview], where: str, errors: list[str]) -> np.ndarray | None:
    if "tokens.npy" not in parts:
        errors.append(f"{where}: no tokens.npy member")
        return None
    try:
        return npy_tokens(parts["tokens.npy"])
    except (ValueError, EOFError, SyntaxError) as exc:
        errors.append(f"{where}: {exc}")
        return None


def read_shard(url: str, expected: int, *, retries: int = 3, backoff_s: float = 1.0) -> ShardRead:
    """A shard's samples with faults isolated; a shard that cannot be fetched at all has every
    sample None."""
    name = url.rsplit("/", 1)[-1]
    try:
        data = fetch(url, retries=retries, backoff_s=backoff_s)
    except OSError as exc:
        return ShardRead([None] * expected, [f"{name}#{i}" for i in range(expected)],
                         [f"{name}: {exc}"])
    read = parse_shard(data, expected, name)
    for error in read.errors:
        log.warning("data: %s", error)
    return read
