"""What ``--data`` names, read for a task: documents (text to score), rows (JSONL records with
named fields) or task samples (token ids with a class or a target), and the data's sha256.

- A ``.txt`` file is ONE document (the way wikitext's and nanoGPT's validation text is scored:
  as one stream, a sliding window across it); several documents: a JSONL with ``text``.
- A ``.jsonl`` (``.gz``, ``.zst``) or ``.parquet`` file: one record per line or row.
- A prepared folder (``megatrain-prepare``, e.g. ``--eval-fraction 1``): its ``eval`` split, one
  document or sample per shard sample, in manifest order; it must have been prepared with the
  model's tokenizer. Its sha256 is that of its ``manifest.json`` (which holds every shard's).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from megatrain.data.manifest import MANIFEST, Manifest, sha256_file
from megatrain.data.prepare.sources import RECORD_SUFFIXES, Document, Record, file_records
from megatrain.data.prepare.tasks import TaskEncoder, TaskOptions, canonical, check_row
from megatrain.data.stream.shard_reader import DEFAULT_IO, parse_shard
from megatrain.data.tar import tar_samples
from megatrain.errors import ConfigError, DataError
from megatrain.eval.model import EvalModel
from megatrain.training.data_setup import tokenizer_matches

TEXT_FIELD = "text"


@dataclass
class TextDoc:
    """A document to score: its token ids (no special tokens) and its UTF-8 length."""

    ids: np.ndarray
    nbytes: int


@dataclass
class TaskSample:
    """A task sample as a prepared shard holds it: ``tokens`` and the extra members (``cls``:
    the class id; ``target``: the target ids)."""

    tokens: np.ndarray
    extra: dict[str, Any]


def data_path(data: str) -> Path:
    """``--data`` as a path; ConfigError when nothing is there."""
    path = Path(data).expanduser()
    if not path.exists():
        raise ConfigError(f"--data {data} does not exist")
    return path


def data_sha256(path: Path) -> str:
    """The file's sha256; a prepared folder's is its manifest's (which names every shard's)."""
    return sha256_file(path / MANIFEST if path.is_dir() else path)


def is_prepared(path: Path) -> bool:
    return path.is_dir()


# --- documents -------------------------------------------------------------------------------


def read_documents(path: Path, loaded: EvalModel, limit: int | None = None) -> list[TextDoc]:
    """The documents of a text file, a JSONL/Parquet with ``text``, or a prepared pretraining
    folder's eval split (at most ``limit``)."""
    if is_prepared(path):
        manifest = _manifest(path, loaded, task=None)
        docs = [TextDoc(np.asarray(tokens, np.int64), int(meta.get("bytes", 0)))
                for tokens, _extra, meta in _shard_samples(manifest, limit)]
        if any(d.nbytes <= 0 for d in docs):
            raise DataError(f"{path}: its samples do not record their bytes (prepare it again "
                            "with this version of megatrain)")
        return docs
    texts = [path.read_text(encoding="utf-8")] if path.suffix == ".txt" else \
        [_text(record) for record in _records(path, limit)]
    texts = [t for t in texts if t.strip()][:limit]
    if not texts:
        raise DataError(f"{path} holds no text")
    ids = loaded.tokenizer.encode_batch(texts)
    return [TextDoc(np.asarray(i, np.int64), len(t.encode("utf-8", "surrogatepass")))
            for i, t in zip(ids, texts)]


def _text(record: Record) -> str:
    data = record.data
    value = data.get(TEXT_FIELD) if isinstance(data, dict) else None
    if not isinstance(value, str):
        raise DataError(f"{record.where}: no {TEXT_FIELD!r} string field (a document is "
                        f'{{"{TEXT_FIELD}": ...}})')
    return value


# --- rows ------------------------------------------------------------------------------------


def _records(path: Path, limit: int | None = None) -> Iterator[Record]:
    """The first ``limit`` records of a JSONL/Parquet file (DataError naming a bad line)."""
    if not path.name.endswith(RECORD_SUFFIXES):
        raise DataError(f"{path}: rows are read from {'/'.join(RECORD_SUFFIXES)} files")
    for n, record in enumerate(file_records(path)):
        if limit is not None and n >= limit:
            return
        yield record


def read_pairs(path: Path, limit: int | None = None) -> list[tuple[str, str, bool]]:
    """(prompt, reference, is SFT) of each ``{"input", "target"}`` or ``{"prompt",
    "completion"}`` (SFT) row; DataError naming the line and the field it lacks."""
    if is_prepared(path):
        raise ConfigError(f"--data {path}: generation tasks read a JSONL of "
                          '{"input", "target"} or {"prompt", "completion"} rows, not a '
                          "prepared folder (its text is tokenized)")
    pairs = []
    for record in _records(path, limit):
        data = record.data if isinstance(record.data, dict) else {}
        sft = "prompt" in data
        names = ("prompt", "completion") if sft else ("input", "target")
        pairs.append((*(_field(data, name, record.where) for name in names), sft))
    if not pairs:
        raise DataError(f"{path} holds no rows")
    return pairs


def _field(data: dict[str, Any], name: str, where: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise DataError(f"{where}: no {name!r} string field (a row is "
                        '{"input", "target"} or {"prompt", "completion"})')
    return value


# --- task samples ----------------------------------------------------------------------------


def read_task_samples(path: Path, fmt: str, loaded: EvalModel, labels: list[str] | None = None,
                      limit: int | None = None) -> tuple[list[TaskSample], int]:
    """(samples, rows dropped) of a ``cls`` or ``seq2seq`` JSONL, tokenized as
    ``megatrain-prepare --format FMT`` does, or of a prepared folder of that format. ``labels``:
    the class names (cls), a row's label must be one of them."""
    if is_prepared(path):
        manifest = _manifest(path, loaded, task=fmt)
        if fmt == "cls" and labels is not None and manifest.task["labels"] != labels:
            raise ConfigError(f"--data {path} names its classes {manifest.task['labels']}, the "
                              f"model {labels}")
        return [TaskSample(np.asarray(t, np.int64), extra or {})
                for t, extra, _ in _shard_samples(manifest, limit)], 0
    options = TaskOptions(fmt)
    rows = [(r.where, check_row(options, r)) for r in _records(path, limit)]
    for where, row in rows if fmt == "cls" else ():
        if row["label"] not in (labels or ()):
            raise DataError(f"{where}: label {row['label']!r} is not one of the model's "
                            f"classes ({', '.join(labels or ())})")
    encoder = TaskEncoder(options, tuple(labels or ()))
    docs = [("eval", Document(f"row-{i}", canonical(row), str(path), where))
            for i, (where, row) in enumerate(rows)]
    encoded = encoder.encode(loaded.tokenizer, docs) if docs else []
    samples = [TaskSample(e.tokens.astype(np.int64), _extra(dict(e.members)))
               for e in encoded if len(e.tokens)]
    if not rows:
        raise DataError(f"{path} holds no rows")
    return samples, len(encoded) - len(samples)


def _extra(members: dict[str, bytes]) -> dict[str, Any]:
    """Encoded members as a shard reader decodes them (``Doc.extra``)."""
    extra: dict[str, Any] = {}
    if "cls" in members:
        extra["cls"] = int(members["cls"])
    if "target.npy" in members:
        extra["target"] = np.lib.format.read_array(BytesIO(members["target.npy"]))
    return extra


# --- prepared folders ------------------------------------------------------------------------


def _manifest(path: Path, loaded: EvalModel, task: str | None) -> Manifest:
    """The folder's manifest, checked: the data the task needs, the model's tokenizer."""
    manifest = Manifest.load(path)
    manifest.check_files()
    fmt = manifest.task["format"] if manifest.task else None
    if fmt != task:
        raise ConfigError(f"--data {path} is {fmt or 'pretraining'} data; this task reads "
                          f"{task or 'pretraining text'}")
    if not tokenizer_matches(loaded.tokenizer_file.parent, manifest):
        raise ConfigError(f"--data {path} was prepared with another tokenizer than "
                          f"{loaded.source}'s; prepare it with megatrain-prepare --tokenizer "
                          f"{loaded.tokenizer_file}")
    return manifest


def _shard_samples(manifest: Manifest, limit: int | None
                   ) -> Iterator[tuple[np.ndarray, dict | None, dict]]:
    """(tokens, extra members, json) of the eval split's samples in order; a corrupt sample is
    a DataError (an eval must not silently score less data)."""
    count = 0
    for shard in manifest.shards("eval"):
        data = DEFAULT_IO.fetch(shard)
        read = parse_shard(data, shard.samples, shard.name)
        if read.errors:
            raise DataError(f"{manifest.root}: {read.errors[0]}")
        metas = {key: json.loads(bytes(parts.get("json", b"{}")))
                 for key, parts in tar_samples(data)[0]}
        for key, tokens, extra in zip(read.keys, read.tokens, read.extras):
            if limit is not None and count >= limit:
                return
            count += 1
            yield tokens, extra, metas.get(key, {})
