"""Raw corpora → a lazy stream of documents.

A SOURCE is a file, a glob, a folder (searched recursively) of ``.txt``, ``.jsonl``,
``.jsonl.gz``, ``.jsonl.zst``, ``.parquet`` or ``.tar`` (WebDataset shards) files, a brace
pattern of those (``corpus-{000000..000127}.tar``, expanded in order) or ``http(s)://`` /
``s3://`` … URLs of WebDataset shards, or ``stdlib``: the Python standard library's own ``.py``
files, present on every machine. Every file is read as a stream (text in bounded windows, JSONL
line by line, Parquet by record batches; a tar shard whole, bounded by ``MAX_TAR_BYTES``), so
memory does not grow with the corpus. Keys are ``<slug>-<running index>``: unique,
deterministic, and free of dots (webdataset splits key and extension at the first dot).

Task data (``megatrain-prepare --format``) is read as *records* instead: each JSONL line or
Parquet row as a dict (:func:`file_records`), named ``file:line`` (1-based) or ``file: row N
(0-based)`` in errors, and keyed like documents (:func:`record_documents`).
"""

from __future__ import annotations

import bisect
import glob
import gzip
import io
import itertools
import json
import os
import re
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from megatrain.data import storage
from megatrain.data.tar import tar_samples
from megatrain.errors import DataError

STDLIB = "stdlib"
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".tar")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
"""The files task data (records with named fields) is read from."""
TAR = ".tar"
MAX_TAR_BYTES = 4 << 30
"""A WebDataset shard is read whole (one at a time): one larger than this is refused, so a wrong
or hostile object can't exhaust memory."""
TEXT_MEMBER, JSON_MEMBER = "txt", "json"
DEFAULT_TEXT_FIELD = "text"
TXT_CHUNK_CHARS = 4096
"""Plain text (a book, a dump) has no document boundaries: split it into ~4 KB paragraph groups."""
LONG_DOC_CHARS = 65536
"""Code files, JSONL records and Parquet rows stay whole unless longer than this; then they are
chunked too."""
READ_BLOCK_CHARS = 1 << 20
"""Text files are read in windows of about this many characters, cut at a paragraph break."""
PARQUET_BATCH_ROWS = 1024
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_SLUG_MAX = 60


Location = Path | str
"""A local file (a Path) or a URL (a string)."""


class Document(NamedTuple):
    """One sample-to-be: ``key`` (webdataset key), ``text``, ``source`` (where it came from);
    for a task record, ``where`` names its line or row for error messages."""

    key: str
    text: str
    source: str
    where: str = ""


class Record(NamedTuple):
    """One JSONL line or Parquet row of task data, as read: ``where`` names it in errors."""

    where: str
    data: Any


def iter_documents(source: str, *, text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[Document]:
    """Documents of ``source`` in a deterministic order; blank documents are skipped.

    ``text_field`` names the JSONL field / Parquet column holding the text. The source is
    resolved at call time, so a missing one raises DataError before any work.
    """
    return file_documents(resolve_files(source), stdlib=source == STDLIB, text_field=text_field)


def file_documents(
    files: list[tuple[Location, str]], *, stdlib: bool = False,
    text_field: str = DEFAULT_TEXT_FIELD,
) -> Iterator[Document]:
    """Documents of already resolved ``(path or URL, label)`` files (:func:`resolve_files`)."""
    index = 0
    for path, label in files:
        slug = slugify(label)
        for text in _file_texts(path, stdlib=stdlib, text_field=text_field):
            if not text or text.isspace():
                continue
            yield Document(f"{slug}-{index:07d}", text, label)
            index += 1


def record_documents(
    files: list[tuple[Location, str]], check: Callable[[Record], str | None]
) -> Iterator[Document]:
    """Documents of the records of already resolved files, keyed as :func:`file_documents` keys
    documents: ``check`` turns a record into the document's text (DataError for a bad one),
    or None to skip it."""
    index = 0
    for path, label in files:
        slug = slugify(label)
        for record in file_records(path):
            text = check(record)
            if text is None:
                continue
            yield Document(f"{slug}-{index:07d}", text, label, record.where)
            index += 1


def file_records(path: Location) -> Iterator[Record]:
    """The records of a ``.jsonl`` (plain, gzip, zstandard) or ``.parquet`` file: each non-blank
    line's JSON value, or each row as a dict of its columns; DataError naming the file for any
    other kind, and naming the line for one that is not JSON."""
    kind = file_kind(path)
    if isinstance(path, str) or kind not in RECORD_SUFFIXES:
        name = storage.redact(path) if isinstance(path, str) else path
        raise DataError(f"{name}: task data is read from {'/'.join(RECORD_SUFFIXES)} files "
                        "(one record per line or row)")
    if kind == ".parquet":
        yield from _parquet_records(path)
        return
    lineno = 0
    try:
        with _open_text(path, kind) as lines:
            for lineno, line in enumerate(lines, 1):
                if line.strip():
                    yield Record(f"{path}:{lineno}", _json_record(line, f"{path}:{lineno}"))
    except _read_errors() as exc:
        raise DataError(f"{path}: unreadable after line {lineno} ({exc})") from exc


def file_kind(path: Location) -> str | None:
    """The supported suffix ``path`` (a path or URL) ends with (``.jsonl.gz`` is one suffix), or
    None."""
    name = path.name if isinstance(path, Path) else path.rsplit("/", 1)[-1]
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def resolve_files(source: str) -> list[tuple[Location, str]]:
    """``(path, label)`` for every file ``source`` names, in reading order: each part of a brace
    pattern in turn, a folder's or glob's files sorted; labels are short, relative names. A URL
    stays a string (nothing is fetched here); a local file is a Path."""
    if source == STDLIB:
        return _stdlib_files()
    files: list[tuple[Location, str]] = []
    for part in _expand_braces(source):
        files += _resolve_url(part) if storage.is_url(part) else _resolve_local(part)
    return files


def _expand_braces(source: str) -> list[str]:
    """``corpus-{000000..000003}.tar`` → its four names, in order (webdataset's own brace
    syntax, from the ``braceexpand`` package it depends on). A path that exists as written is
    taken literally."""
    if "{" not in source or (not storage.is_url(source) and Path(source).expanduser().exists()):
        return [source]
    from braceexpand import UnbalancedBracesError, braceexpand

    try:
        return list(braceexpand(source))
    except UnbalancedBracesError as exc:
        raise DataError(f"source {storage.redact(source)!r}: {exc}") from exc


def _resolve_url(url: str) -> list[tuple[Location, str]]:
    """A URL names one WebDataset shard (globs need listing, which HTTP can't do: use a brace
    pattern); its label is its file name."""
    try:
        storage.check_no_credentials(url, "--source")
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    if url.startswith(storage.PIPE) or file_kind(url) != TAR:
        raise DataError(f"source {storage.redact(url)!r}: a URL source must name WebDataset "
                        f"{TAR} shards (use a brace pattern for several)")
    return [(url, url.rsplit("/", 1)[-1])]


def _resolve_local(source: str) -> list[tuple[Location, str]]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and file_kind(p)]
        return _labelled(files, path, source)
    if path.is_file():
        _check_suffix(path)
        return [(path, path.name)]
    matches = [Path(m) for m in sorted(glob.glob(str(path), recursive=True))]
    files = [p for p in matches if p.is_file() and file_kind(p)]
    if not files:
        raise DataError(
            f"source {source!r} is not a file, folder, glob or 'stdlib' with any "
            f"{'/'.join(SUFFIXES)} files"
        )
    return [(p, p.name) for p in files]


def file_stamp(location: Location) -> str:
    """What identifies the version of an input (for the resume fingerprint): a local file's size
    and mtime; for a URL, the size and the version fields its store reports (ETag, modification
    time). DataError naming a URL that can't be found."""
    if isinstance(location, Path):
        st = location.stat()
        return f"{st.st_size}\0{st.st_mtime_ns}"
    fs, path = storage.filesystem(location)
    try:
        info = storage.with_retries(location, lambda: fs.info(path))
    except OSError as exc:
        raise DataError(str(exc)) from exc
    version = {k: str(v) for k, v in info.items() if k.lower().replace("-", "").replace("_", "")
               in _VERSION_FIELDS}
    return json.dumps(version, sort_keys=True)


_VERSION_FIELDS = {"size", "etag", "lastmodified", "mtime", "contentmd5", "digest", "generation",
                   "md5hash", "versionid"}


def _labelled(files: list[Path], root: Path, source: str) -> list[tuple[Location, str]]:
    if not files:
        raise DataError(f"source folder {source!r} holds no {'/'.join(SUFFIXES)} files")
    return [(p, p.relative_to(root).as_posix()) for p in files]


def _check_suffix(path: Path) -> None:
    if file_kind(path) is None:
        raise DataError(f"source file {path} has an unsupported type; use {'/'.join(SUFFIXES)}")


def _stdlib_files() -> list[tuple[Location, str]]:
    """The standard library's ``.py`` files, without third-party packages or caches."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"source 'stdlib': the standard library folder {root} does not exist")
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]  # pruned, not walked (fast)
        rel = os.path.relpath(folder, root).split(os.sep) if folder != str(root) else []
        found += [(*rel, n) for n in names if n.endswith(".py")]
    files = [(root.joinpath(*parts), "stdlib/" + "/".join(parts)) for parts in sorted(found)]
    return [(path, label) for path, label in files if path.is_file()]


def _file_texts(path: Location, *, stdlib: bool, text_field: str) -> Iterator[str]:
    """The document texts of one file, chunked; blank ones may be among them."""
    kind = ".txt" if stdlib else file_kind(path)
    if kind == TAR:
        records = _tar_texts(path, text_field)
    elif isinstance(path, str):  # pragma: no cover - resolve_files admits only .tar URLs
        raise DataError(f"{storage.redact(path)}: only {TAR} shards are read from URLs")
    elif kind == ".txt":
        yield from _text_file_chunks(path, LONG_DOC_CHARS if stdlib else TXT_CHUNK_CHARS)
        return
    elif kind == ".parquet":
        records = _parquet_texts(path, text_field)
    else:
        records = _jsonl_texts(path, kind, text_field)
    for text in records:
        yield from chunk_text(text, LONG_DOC_CHARS)


# --- plain text -----------------------------------------------------------------------------


def _text_file_chunks(path: Path, max_chars: int) -> Iterator[str]:
    """Chunks of a text file read in windows of ~``READ_BLOCK_CHARS`` (see :func:`window_cut`)."""
    carry = ""
    with path.open(encoding="utf-8", errors="replace") as f:
        block = f.read(READ_BLOCK_CHARS)
        while block:
            following = f.read(READ_BLOCK_CHARS)  # read ahead: the last window is never cut
            buffer = carry + block
            cut = window_cut(buffer, 4 * READ_BLOCK_CHARS) if following else -1
            if cut < 0:
                carry = buffer
            else:
                yield from chunk_text(buffer[:cut], max_chars)
                carry = buffer[cut:]
            block = following
    yield from chunk_text(carry, max_chars)


def window_cut(text: str, limit: int) -> int:
    """Where a window of a longer text may end, so that what follows does not change it.

    After the last paragraph break (a blank line followed by a non-newline character), else
    after the last newline, else at ``len(text)`` once ``text`` is over ``limit`` characters (a
    single huge line), else -1: read more first. A trailing run of newlines is never a cut point:
    the next block may extend it.
    """
    body = text.rstrip("\n")
    i = body.rfind("\n\n")
    if i >= 0:
        return i + 2  # body[i + 2] exists and is not "\n": i is the last "\n\n" of body
    i = body.rfind("\n")
    if i >= 0:
        return i + 1
    return len(text) if len(text) > limit else -1


# --- JSONL (plain, gzip, zstandard) ---------------------------------------------------------


def _open_text(path: Path, kind: str) -> TextIO:
    if kind == ".jsonl.gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if kind == ".jsonl.zst":
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(
            path.open("rb"), read_across_frames=True, closefd=True
        )
        return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


def _read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a compressed or binary file is damaged."""
    errors: list[type[BaseException]] = [OSError, EOFError]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover - zstandard is a dependency
        pass
    return tuple(errors)


def _jsonl_texts(path: Path, kind: str, field: str) -> Iterator[str]:
    """The ``field`` string of each line; DataError naming file and line for a bad one."""
    lineno = 0
    try:
        with _open_text(path, kind) as lines:
            for lineno, line in enumerate(lines, 1):
                if line.strip():
                    yield _json_text(line, field, f"{path}:{lineno}")
    except _read_errors() as exc:
        raise DataError(f"{path}: unreadable after line {lineno} ({exc})") from exc


def _json_text(line: str, field: str, where: str) -> str:
    try:
        text = json.loads(line)[field]
    except (json.JSONDecodeError, KeyError, TypeError, IndexError) as exc:
        raise DataError(
            f"{where}: expected a JSON object with a {field!r} field (see --text-field)"
        ) from exc
    if not isinstance(text, str):
        raise DataError(f"{where}: {field!r} must be a string, got {type(text).__name__}")
    return _without_surrogates(text) if _escapes_surrogates(line) else text


def _json_record(line: str, where: str) -> Any:
    """A JSONL line's value, its strings without lone surrogates; DataError naming ``where``."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from exc
    return _strings_without_surrogates(value) if _escapes_surrogates(line) else value


def _escapes_surrogates(line: str) -> bool:
    """JSON may escape lone surrogates (``\\ud800``); UTF-8 cannot hold them."""
    return "\\ud" in line or "\\uD" in line


def _without_surrogates(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _strings_without_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _without_surrogates(value)
    if isinstance(value, list):
        return [_strings_without_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {k: _strings_without_surrogates(v) for k, v in value.items()}
    return value


# --- Parquet --------------------------------------------------------------------------------


def _parquet_texts(path: Path, column: str) -> Iterator[str]:
    """The ``column`` strings of each row, read one record batch at a time."""
    import pyarrow as pa

    parquet = _open_parquet(path)
    _check_text_column(path, parquet.schema_arrow, column)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
            for value in batch.column(0).to_pylist():
                if value is None:
                    raise DataError(f"{path}: row {row} (0-based): {column!r} is null")
                yield value
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: unreadable at row {row} (0-based) ({exc})") from exc


def _parquet_records(path: Path) -> Iterator[Record]:
    """Each row as a dict of all its columns (nested lists and structs as lists and dicts), one
    record batch at a time."""
    import pyarrow as pa

    parquet = _open_parquet(path)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for data in batch.to_pylist():
                yield Record(f"{path}: row {row} (0-based)", data)
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: unreadable at row {row} (0-based) ({exc})") from exc


def _open_parquet(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc


def _check_text_column(path: Path, schema: object, column: str) -> None:
    import pyarrow as pa

    if column not in schema.names:
        raise DataError(
            f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); "
            "choose one with --text-field"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise DataError(f"{path}: column {column!r} holds {kind}, not strings")


# --- WebDataset tar shards -----------------------------------------------------------------


def _tar_texts(location: Location, field: str) -> Iterator[str]:
    """The text of each sample of a WebDataset shard, in tar order: its ``txt`` member, else the
    ``field`` string of its ``json`` member. The shard is read whole (bounded by
    ``MAX_TAR_BYTES``) and walked by :func:`megatrain.data.tar.tar_samples`, which stops at a
    damaged header or a member whose name would leave the folder (``../x``, ``/x``); either is
    a DataError naming the shard and the place, raised before any of its samples is used."""
    where = storage.redact(str(location))
    try:
        data = storage.read_bytes(str(location), limit=MAX_TAR_BYTES)
    except OSError as exc:  # StorageError: it names the location, without credentials
        raise DataError(f"{where}: cannot read the shard ({exc})") from exc
    samples, stop = tar_samples(data)
    if stop:
        raise DataError(f"{where}: not a readable tar: {stop} (after {len(samples)} samples)")
    for key, parts in samples:
        yield _sample_text(key, parts, field, where)


def _sample_text(key: str, parts: dict[str, memoryview], field: str, where: str) -> str:
    if TEXT_MEMBER in parts:
        return bytes(parts[TEXT_MEMBER]).decode("utf-8", "replace")
    if JSON_MEMBER in parts:
        line = bytes(parts[JSON_MEMBER]).decode("utf-8", "replace")
        return _json_text(line, field, f"{where}: sample {key!r}: {JSON_MEMBER} member")
    members = ", ".join(parts) or "none"
    raise DataError(f"{where}: sample {key!r} has no {TEXT_MEMBER} or {JSON_MEMBER} member "
                    f"(members: {members})")


# --- chunking -------------------------------------------------------------------------------


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split ``text`` into pieces of about ``max_chars`` whose concatenation is ``text``.

    Cuts fall after blank lines where possible, else after newlines, else mid-line. Blank-only
    text yields nothing (empty documents are skipped).
    """
    if not text.strip():
        return []
    if len(text) <= max_chars:
        return [text]
    pieces = []
    for paragraph in re.split(r"(?<=\n\n)(?!\n)", text):
        if len(paragraph) <= max_chars:
            pieces.append(paragraph)
            continue
        for line in paragraph.splitlines(keepends=True):
            pieces.extend(line[i : i + max_chars] for i in range(0, len(line), max_chars))
    return _group(pieces, max_chars)


def _group(pieces: list[str], max_chars: int) -> list[str]:
    """Concatenate consecutive pieces (each at most ``max_chars``) into chunks of at most
    ``max_chars``, greedily: a chunk takes pieces while they fit. One bisect per chunk over the
    running lengths, not a Python step per piece (code files have many short paragraphs)."""
    ends = [0, *itertools.accumulate(map(len, pieces))]
    chunks: list[str] = []
    start = 0
    while start < len(pieces):
        stop = bisect.bisect_right(ends, ends[start] + max_chars) - 1
        chunks.append("".join(pieces[start:stop]))
        start = stop
    return chunks


def slugify(label: str) -> str:
    """A short, dot-free, webdataset-safe slug of ``label`` (``json/decoder.py`` → ``json-decoder_py``)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", label.replace("/", "-")).strip("_-")
    return slug[-_SLUG_MAX:].lstrip("_-") or "doc"
