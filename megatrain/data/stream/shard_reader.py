"""Reading one shard with per-sample fault isolation, and retrying remote shards.

A shard is read whole into memory (a few MB) and walked header by header, so one bad part
costs only what it spoils: a corrupt member skips its sample, a truncated tar skips the samples
after the cut, an empty or unreadable file skips the shard. Token arrays are zero-copy views into
the shard's bytes. Remote shards (``http(s)://``, ``pipe:``) are fetched through webdataset's
``gopen`` and retried with exponential backoff; a local file is not retried (a missing local
shard is reported at start by ``Manifest.check_files``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatrain.data.tar import npy_tokens, tar_samples

log = logging.getLogger("megatrain")

REMOTE_PREFIXES = ("http://", "https://", "pipe:")


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


def parse_shard(data: bytes, expected: int, name: str) -> ShardRead:
    """Samples ``0..expected-1`` of a shard's bytes in tar order; a bad sample is None."""
    samples, stop = tar_samples(data)
    read = ShardRead([], [])
    if stop:
        read.errors.append(f"{name}: {stop}")
    for key, parts in samples[:expected]:
        read.keys.append(key)
        read.tokens.append(_sample_tokens(parts, f"{name}:{key}", read.errors))
    read.keys += [f"{name}#{i}" for i in range(len(read.keys), expected)]
    read.tokens += [None] * (expected - len(read.tokens))
    return read


def _sample_tokens(parts: dict[str, memoryview], where: str, errors: list[str]) -> np.ndarray | None:
    if "tokens.npy" not in parts:
        errors.append(f"{where}: no tokens.npy member")
        return None
    try:
        return npy_tokens(parts["tokens.npy"])
    except ValueError as exc:
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
