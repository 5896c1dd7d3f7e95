"""Where corpora live: a local folder, a URL (``s3://``, ``gs://``, ``http(s)://``, any fsspec
protocol) or, for shards, a ``pipe:`` command.

Why fsspec (with s3fs, and gcsfs when installed): one interface for every store that reads whole
objects or byte ranges, lists and writes them (``megatrain-prepare --out s3://…``), and takes
credentials and endpoints from each store's standard environment — botocore's ``AWS_*``
variables, ``AWS_ENDPOINT_URL`` and profiles for S3, Google's application-default credentials for
GCS — never from megatrain's config. webdataset's ``gopen`` starts a ``curl`` or ``aws``
process per object and cannot list or write, so it serves only ``pipe:`` shards, which are its
own convention.

Every read is bounded (a manifest, a tokenizer or a shard can't make a reader allocate more than
it is known to hold) and retried with exponential backoff on transport errors; an object that does
not exist or is forbidden fails at once. Error messages carry the URL with any credentials in it
removed (:func:`redact`).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("megatrain")

T = TypeVar("T")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
PIPE = "pipe:"
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF_S = 1.0
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class StorageError(OSError):
    """A location could not be read or written (after retries, where retrying made sense)."""


def is_url(location: str | Path) -> bool:
    """True for ``scheme://…`` (but not ``file://``) and ``pipe:`` locations."""
    location = str(location)
    return location.startswith(PIPE) or (bool(SCHEME.match(location))
                                         and not location.startswith("file://"))


def local_path(location: str | Path) -> Path:
    return Path(str(location).removeprefix("file://"))


def join(base: str | Path, name: str) -> str:
    """``name`` inside the folder ``base``, for a path or a URL alike; for a ``pipe:`` command,
    the command with ``{}`` replaced by ``name`` (``pipe:aws s3 cp s3://b/corpus/{} -``)."""
    base = str(base)
    if base.startswith(PIPE):
        if "{}" not in base:
            raise ValueError(f"{redact(base)}: a pipe: corpus needs {{}} where a file name goes, "
                             "e.g. 'pipe:aws s3 cp s3://bucket/corpus/{} -'")
        return base.replace("{}", name)
    if is_url(base):
        return f"{base.rstrip('/')}/{name}"
    return str(local_path(base) / name)


def redact(text: str) -> str:
    """``text`` with the credentials a URL may carry removed: ``user:secret@`` and the query of a
    signed URL (``X-Amz-Signature``, ``sig``, ``token`` …)."""
    text = re.sub(r"(://)[^/\s@]+@", r"\1***@", text)
    return re.sub(r"\?[^\s'\"]*(signature|sig|token|key|credential)[^\s'\"]*", "?***", text,
                  flags=re.IGNORECASE)


def check_no_credentials(location: str, key: str) -> None:
    """ValueError when a URL embeds credentials: they belong in the environment, where they
    never reach config.yaml, logs or W&B."""
    if is_url(location) and redact(location) != location:
        raise ValueError(f"{key}={redact(location)} carries credentials in the URL; give them in "
                         "the store's standard environment instead (AWS_ACCESS_KEY_ID / "
                         "AWS_SECRET_ACCESS_KEY or AWS_PROFILE for s3://, ~/.netrc for https://)")


def _options(protocol: str) -> dict[str, Any]:
    """Timeouts, and our retries instead of the client's own (one policy, one log line each)."""
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": CONNECT_TIMEOUT_S,
                                  "read_timeout": READ_TIMEOUT_S,
                                  "retries": {"max_attempts": 1, "mode": "standard"}}}
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {  # trust_env: proxies and ~/.netrc, as curl would use them
            "trust_env": True,
            "timeout": aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S,
                                             sock_read=READ_TIMEOUT_S)}}
    return {}


def filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem for ``url`` and the path within it (instances are cached per
    process by fsspec, and rebuilt after a fork)."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        return fsspec.url_to_fs(url, **_options(protocol))
    except ImportError as exc:
        extra = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs"}.get(protocol, f"fsspec[{protocol}]")
        raise StorageError(f"reading {protocol}:// needs the {extra} package "
                           f"(pip install {extra})") from exc


def with_retries(location: str, action: Callable[[], T], *, retries: int = DEFAULT_RETRIES,
                 backoff_s: float = DEFAULT_BACKOFF_S,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """``action()``, retried ``retries`` times after transport errors, waiting backoff·2^k;
    StorageError naming ``location`` once they are spent (at once for a missing or forbidden
    object)."""
    for attempt in range(retries + 1):
        try:
            return action()
        except Exception as exc:  # any transport failure is retried the same way
            if not transient(exc):
                raise StorageError(f"{redact(location)}: {redact(_describe(exc))}") from exc
            if attempt == retries:
                raise StorageError(f"{redact(location)}: failed after {retries + 1} attempts "
                                   f"({redact(_describe(exc))})") from exc
            wait = backoff_s * 2**attempt
            log.warning("%s: %s; retrying in %.1fs (%d/%d)", redact(location),
                        redact(_describe(exc)), wait, attempt + 1, retries)
            sleep(wait)
    raise AssertionError("unreachable")


def transient(exc: BaseException) -> bool:
    """Whether retrying may help: not for a missing or forbidden object, nor for an HTTP
    client error (4xx: a bad range, a malformed request) other than a timeout or throttling."""
    if isinstance(exc, _NOT_TRANSIENT):
        return False
    status = getattr(exc, "status", None)
    return not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def read_bytes(location: str, *, limit: int, retries: int = DEFAULT_RETRIES,
               backoff_s: float = DEFAULT_BACKOFF_S) -> bytes:
    """The bytes at ``location``; StorageError if it holds more than ``limit`` bytes (read as a
    byte range, so a wrong or hostile object can't exhaust memory) or cannot be read."""
    if location.startswith(PIPE):
        data = with_retries(location, lambda: _read_pipe(location, limit), retries=retries,
                            backoff_s=backoff_s)
    elif is_url(location):
        fs, path = filesystem(location)
        data = with_retries(location, lambda: fs.cat_file(path, start=0, end=limit + 1),
                            retries=retries, backoff_s=backoff_s)
    else:
        data = with_retries(location, lambda: _read_local(local_path(location), limit),
                            retries=0)
    if len(data) > limit:
        raise StorageError(f"{redact(location)} holds more than the {limit} bytes expected")
    return data


def _read_local(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        return f.read(limit + 1)


def _read_pipe(location: str, limit: int) -> bytes:
    from webdataset.gopen import gopen

    stream = gopen(location, "rb")
    try:
        return stream.read(limit + 1)
    finally:
        stream.close()  # a pipe's non-zero exit status raises here


def exists(location: str) -> bool:
    if location.startswith(PIPE):  # a command can only tell by running
        try:
            _read_pipe(location, 64 << 20)  # whole: a command cut short fails
        except OSError:
            return False
        return True
    if is_url(location):
        fs, path = filesystem(location)
        return with_retries(location, lambda: fs.exists(path))
    return local_path(location).exists()


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole object: a local file through a temporary file and a rename, a remote object
    in one PUT — either way a reader sees all of it or none."""
    if is_url(location):
        fs, path = filesystem(location)
        with_retries(location, lambda: fs.pipe_file(path, data))
        return
    path = local_path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def upload(local: Path, location: str) -> None:
    """Copy a local file to ``location`` (whole, as :func:`write_bytes`)."""
    if not is_url(location):
        write_bytes(location, local.read_bytes())
        return
    fs, path = filesystem(location)
    with_retries(location, lambda: fs.put_file(str(local), path))


def remove(location: str) -> None:
    """Delete an object or file if it exists."""
    if is_url(location):
        fs, path = filesystem(location)
        if fs.exists(path):
            with_retries(location, lambda: fs.rm_file(path))
        return
    local_path(location).unlink(missing_ok=True)
