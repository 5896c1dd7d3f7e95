"""Raw corpora → a lazy stream of documents.

A SOURCE is a ``.txt`` / ``.jsonl`` file, a glob, a folder (searched recursively), or ``stdlib``:
the Python standard library's own ``.py`` files, present on every machine. Documents stream one
file at a time, so memory does not grow with the corpus. Keys are ``<slug>-<running index>``:
unique, deterministic, and free of dots (webdataset splits key and extension at the first dot).
"""

from __future__ import annotations

import glob
import json
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from megatrain.errors import DataError

STDLIB = "stdlib"
SUFFIXES = (".txt", ".jsonl")
TXT_CHUNK_CHARS = 4096
"""Plain text (a book, a dump) has no document boundaries: split it into ~4 KB paragraph groups."""
LONG_DOC_CHARS = 65536
"""Code files and JSONL records stay whole unless longer than this; then they are chunked too."""
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_SLUG_MAX = 60


class Document(NamedTuple):
    """One sample-to-be: ``key`` (webdataset key), ``text``, ``source`` (where it came from)."""

    key: str
    text: str
    source: str


def iter_documents(source: str) -> Iterator[Document]:
    """Documents of ``source`` in a deterministic order.

    The source is resolved at call time, so a missing one raises DataError before any work.
    """
    return _documents(resolve_files(source), stdlib=source == STDLIB)


def _documents(files: list[tuple[Path, str]], *, stdlib: bool) -> Iterator[Document]:
    index = 0
    for path, label in files:
        slug = slugify(label)
        for text in _file_texts(path, stdlib=stdlib):
            yield Document(f"{slug}-{index:07d}", text, label)
            index += 1


def resolve_files(source: str) -> list[tuple[Path, str]]:
    """``(path, label)`` for every file ``source`` names, sorted; labels are short, relative names."""
    if source == STDLIB:
        return _stdlib_files()
    path = Path(source).expanduser()
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in SUFFIXES]
        return _labelled(files, path, source)
    if path.is_file():
        _check_suffix(path)
        return [(path, path.name)]
    matches = [Path(m) for m in sorted(glob.glob(str(path), recursive=True))]
    files = [p for p in matches if p.is_file() and p.suffix in SUFFIXES]
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
    if path.suffix not in SUFFIXES:
        raise DataError(f"source file {path} has an unsupported type; use {'/'.join(SUFFIXES)}")


def _stdlib_files() -> list[tuple[Path, str]]:
    """The standard library's ``.py`` files, without third-party packages or caches."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"source 'stdlib': the standard library folder {root} does not exist")
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.isdisjoint(rel.parts) and path.is_file():
            files.append((path, f"stdlib/{rel.as_posix()}"))
    return files


def _file_texts(path: Path, *, stdlib: bool) -> Iterator[str]:
    """The non-empty document texts of one file."""
    if path.suffix == ".jsonl":
        for text in _jsonl_texts(path):
            yield from chunk_text(text, LONG_DOC_CHARS)
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    yield from chunk_text(text, LONG_DOC_CHARS if stdlib else TXT_CHUNK_CHARS)


def _jsonl_texts(path: Path) -> Iterator[str]:
    """The ``text`` field of each line; DataError naming file and line when one is malformed."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object with a 'text' field"
                ) from exc
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: 'text' must be a string")
            yield text


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
    """Concatenate consecutive pieces into chunks of at most ``max_chars``."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for piece in pieces:
        if current and size + len(piece) > max_chars:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(piece)
        size += len(piece)
    if current:
        chunks.append("".join(current))
    return chunks


def slugify(label: str) -> str:
    """A short, dot-free, webdataset-safe slug of ``label`` (``json/decoder.py`` → ``json-decoder_py``)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", label.replace("/", "-")).strip("_-")
    return slug[-_SLUG_MAX:].lstrip("_-") or "doc"
