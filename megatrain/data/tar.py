"""The one tar reader for prepared shards: members straight from the bytes, zero-copy.

The stream (``data.stream.shard_reader``), ``--verify`` and a resumed prepare all read shards
through it. It walks the headers itself rather than through ``tarfile`` so that a damaged shard
yields every sample before the damage and says where it stopped, and token arrays are views
into the bytes.
Handles ustar prefixes, GNU long names and pax paths.
"""

from __future__ import annotations

import io

import numpy as np

TOKEN_DTYPES = (np.dtype("<u2"), np.dtype("<u4"))
BLOCK = 512


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
    at a clean end; a member with an unsafe name stops it). Handles ustar prefixes, GNU long
    names and pax paths."""
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
            if not safe_member_name(name):
                return members, f"member {name!r} at byte {body_at - BLOCK} has an unsafe name"
            members.append((name, body))
    if not data:
        return members, "empty file"
    return members, "truncated (a partial block at the end)" if pos != len(data) else None


def safe_member_name(name: str) -> bool:
    """False for a name that would leave the tar's folder if extracted: absolute, or with a
    ``..`` component. Such a shard is hostile or broken; nothing after that member is read."""
    parts = name.replace("\\", "/").split("/")
    return bool(name) and not name.startswith("/") and ".." not in parts


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


def tar_samples(data: bytes) -> tuple[list[tuple[str, dict[str, memoryview]]], str | None]:
    """webdataset samples ``(key, {extension: bytes})`` in tar order, and why the walk stopped
    early (None at a clean end)."""
    members, stop = tar_members(data)
    samples: list[tuple[str, dict[str, memoryview]]] = []
    for name, body in members:
        key, ext = split_name(name)
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][ext] = body
    return samples, stop


def npy_tokens(data: memoryview) -> np.ndarray:
    """A 1-d little-endian uint16/uint32 ``.npy`` as a zero-copy view; ValueError otherwise."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, _fortran, dtype = reader(f)
    except (EOFError, SyntaxError) as exc:  # a cut or garbled header: numpy's own exceptions
        raise ValueError(f"unreadable .npy header ({exc})") from exc
    if len(shape) != 1 or dtype not in TOKEN_DTYPES:
        raise ValueError(f"tokens are {dtype}{list(shape)}, expected 1-d uint16/uint32")
    start = f.tell()
    if len(data) - start != shape[0] * dtype.itemsize:
        raise ValueError(f"tokens.npy holds {len(data) - start} bytes, its header says "
                         f"{shape[0] * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype, count=shape[0], offset=start)
