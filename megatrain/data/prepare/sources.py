"""Raw corpora → a lazy stream of documents.

A SOURCE is a file, a glob, a folder (searched recursively) of ``.txt``, ``.jsonl``,
``.jsonl.gz``, ``.jsonl.zst`` or ``.parquet`` files, or ``stdlib``: the Python standard library's
own ``.py`` files, present on every machine. Every file is read as a stream (text in bounded
windows, JSONL line by line, Parquet by record batches), so memory does not grow with the corpus.
Keys are ``<slug>-<running index>``: unique, deterministic, and free of dots (webdataset splits
key and extension at the first dot).
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
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, TextIO

from megatrain.errors import DataError

STDLIB = "stdlib"
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
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


class Document(NamedTuple):
    """One sample-to-be: ``key`` (webdataset key), ``text``, ``source`` (where it came from)."""

    key: str
    text: str
    source: str


def iter_documents(source: str, *, text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[Document]:
    """Documents of ``source`` in a deterministic order; blank documents are skipped.

    ``text_field`` names the JSONL field / Parquet column holding the text. The source is
    resolved at call time, so a missing one raises DataError before any work.
    """
    return file_documents(resolve_files(source), stdlib=source == STDLIB, text_field=text_field)


def file_documents(
    files: list[tuple[Path, str]], *, stdlib: bool = False, text_field: str = DEFAULT_TEXT_FIELD
) -> Iterator[Document]:
    """Documents of already resolved ``(path, label)`` files (:func:`resolve_files`)."""
    index = 0
    for path, label in files:
        slug = slugify(label)
        for text in _file_texts(path, stdlib=stdlib, text_field=text_field):
            if not text or text.isspace():
                continue
            yield Document(f"{slug}-{index:07d}", text, label)
            index += 1


def file_kind(path: Path) -> str | None:
    """The supported suffix ``path`` ends with (``.jsonl.gz`` is one suffix), or None."""
    return next((s for s in SUFFIXES if path.name.endswith(s)), None)


def resolve_files(source: str) -> list[tuple[Path, str]]:
    """``(path, label)`` for every file ``source`` names, sorted; labels are short, relative names."""
    if source == STDLIB:
        return _stdlib_files()
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


def _labelled(files: list[Path], root: Path, source: str) -> list[tuple[Path, str]]:
    if not files:
        raise DataError(f"source folder {source!r} holds no {'/'.join(SUFFIXES)} files")
    return [(p, p.relative_to(root).as_posix()) for p in files]


def _check_suffix(path: Path) -> None:
    if file_kind(path) is None:
        raise DataError(f"source file {path} has an unsupported type; use {'/'.join(SUFFIXES)}")


def _stdlib_files() -> list[tuple[Path, str]]:
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


def _file_texts(path: Path, *, stdlib: bool, text_field: str) -> Iterator[str]:
    """The document texts of one file, chunked; blank ones may be among them."""
    kind = ".txt" if stdlib else file_kind(path)
    if kind == ".txt":
        yield from _text_file_chunks(path, LONG_DOC_CHARS if stdlib else TXT_CHUNK_CHARS)
        return
    if kind == ".parquet":
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
    if "\\ud" in line or "\\uD" in line:  # JSON may escape lone surrogates; UTF-8 cannot hold them
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


# --- Parquet --------------------------------------------------------------------------------


def _parquet_texts(path: Path, column: str) -> Iterator[str]:
    """The ``column`` strings of each row, read one record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
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
