"""Raw corpus → tokenizer + tokenized WebDataset shards + ``manifest.json``.

Documents are tokenized in worker processes with a bounded number of chunks in flight (memory
does not grow with the corpus) and results are consumed in submission order, so the shards are
byte-identical for the same inputs and tokenizer, whatever the worker count.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import itertools
import json
import logging
import multiprocessing as mp
import shutil
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import webdataset as wds
from tqdm import tqdm

from megatrain.data.manifest import MANIFEST, Manifest, ShardInfo, sha256_file
from megatrain.data.sources import Document, iter_documents, slugify
from megatrain.data.tokenizer import TOKENIZER_FORMAT, Tokenizer, train_tokenizer
from megatrain.errors import ConfigError, DataError

TOKENIZER_FILE = "tokenizer.model"
CHUNK_DOCS = 32
IN_FLIGHT_PER_WORKER = 4

log = logging.getLogger("megatrain")


class Encoded(NamedTuple):
    """A tokenized document, ready for a shard."""

    key: str
    source: str
    nbytes: int
    tokens: np.ndarray


def prepare(
    source: str,
    out: Path,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    eval_fraction: float = 0.01,
    shard_tokens: int = 1_000_000,
    workers: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> Manifest:
    """Tokenize ``source`` into ``out``; returns the manifest, which is written last."""
    _check_args(eval_fraction, shard_tokens, workers)
    out = Path(out)
    documents = iter_documents(source)  # resolves the source now: fail before any work
    out.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out)
    model = _tokenizer_model(source, out, tokenizer, vocab_size, workers, seed)
    tok = Tokenizer.load(model)
    writer = CorpusWriter(out, tok.vocab_size, shard_tokens, eval_fraction, seed)
    bar = tqdm(desc="tokenizing", unit="doc", file=sys.stderr,
               disable=not (progress and sys.stderr.isatty()))
    with bar:
        for encoded in encode_documents(documents, model, workers):
            writer.add(encoded)
            bar.update()
    splits = writer.close()
    manifest = Manifest(out, source, seed, _tokenizer_entry(tok), splits, writer.stats())
    manifest.save()
    return manifest


def _check_args(eval_fraction: float, shard_tokens: int, workers: int) -> None:
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens must be positive, got {shard_tokens}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")


def _clear_outputs(out: Path) -> None:
    """Remove a previous run's manifest first (so a crash leaves no stale index), then its shards."""
    (out / MANIFEST).unlink(missing_ok=True)
    for old in itertools.chain(out.glob("train-*.tar"), out.glob("eval-*.tar")):
        old.unlink()


def _tokenizer_model(
    source: str, out: Path, tokenizer: str | None, vocab_size: int, workers: int, seed: int
) -> Path:
    """Copy the given model into ``out``, or train one on ``source``."""
    target = out / TOKENIZER_FILE
    if tokenizer is None:
        texts = (doc.text for doc in iter_documents(source))
        return train_tokenizer(texts, target, vocab_size, threads=workers, seed=seed)
    given = Path(tokenizer)
    Tokenizer.load(given)  # DataError if missing or not a model
    if given.resolve() != target.resolve():
        shutil.copyfile(given, target)
    return target


def _tokenizer_entry(tok: Tokenizer) -> dict[str, object]:
    return {
        "file": TOKENIZER_FILE,
        "sha256": sha256_file(tok.path),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
    }


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The smallest dtype the shards use for ids below ``vocab_size``."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


# --- tokenization in worker processes -------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(model: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(model)


def _encode_chunk(docs: list[Document]) -> list[Encoded]:
    """Tokenize a chunk of documents in a worker (or in-process when there is one worker)."""
    assert _worker_tokenizer is not None, "worker not initialized"
    dtype = token_dtype(_worker_tokenizer.vocab_size)
    ids = _worker_tokenizer.encode_batch([d.text for d in docs])
    return [
        Encoded(d.key, d.source, len(d.text.encode("utf-8")), np.asarray(t, dtype=dtype))
        for d, t in zip(docs, ids)
    ]


def encode_documents(docs: Iterable[Document], model: Path, workers: int) -> Iterator[Encoded]:
    """Tokenized documents in input order; ``workers`` processes, at most a few chunks queued."""
    chunks = _chunks(docs, CHUNK_DOCS)
    if workers == 1:
        _init_worker(str(model))
        for chunk in chunks:
            yield from _encode_chunk(chunk)
        return
    with mp.Pool(workers, initializer=_init_worker, initargs=(str(model),)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def _chunks(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    iterator = iter(docs)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


# --- writing shards -------------------------------------------------------------------------


class ShardWriter:
    """Writes one split's samples to ``<split>-NNNNNN.tar``, rolling over every ``shard_tokens``."""

    def __init__(self, out: Path, split: str, shard_tokens: int) -> None:
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.shards: list[ShardInfo] = []
        self._file: io.BufferedWriter | None = None
        self._tar: wds.TarWriter | None = None
        self._samples = self._tokens = 0

    def write(self, doc: Encoded) -> None:
        if self._tar is None:
            self._open()
        meta = json.dumps({"source": doc.source, "bytes": doc.nbytes}, sort_keys=True)
        self._tar.write(
            {"__key__": doc.key, "tokens.npy": _npy_bytes(doc.tokens), "json": meta.encode()}
        )
        self._samples += 1
        self._tokens += len(doc.tokens)
        if self._tokens >= self.shard_tokens:
            self._close_shard()

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._file = (self.out / name).open("wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
        self._samples = self._tokens = 0

    def _close_shard(self) -> None:
        self._tar.close()
        self._file.close()
        path = Path(self._file.name)
        self.shards.append(
            ShardInfo(path.name, path, self._samples, self._tokens, sha256_file(path))
        )
        self._tar = self._file = None


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class CorpusWriter:
    """Routes documents to the train or eval split and keeps the corpus statistics.

    A document is held for eval when ``hash(seed, key) < eval_fraction``. So that a small corpus
    still gets an eval split, the lowest-hash train document is held back until the first eval
    document appears; if none does, it becomes the eval split.
    """

    def __init__(
        self, out: Path, vocab_size: int, shard_tokens: int, eval_fraction: float, seed: int
    ):
        self.writers = {s: ShardWriter(out, s, shard_tokens) for s in ("train", "eval")}
        self.eval_fraction, self.seed = eval_fraction, seed
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.documents = {"train": 0, "eval": 0}
        self.tokens = {"train": 0, "eval": 0}
        self._held: tuple[float, Encoded] | None = None

    def add(self, doc: Encoded) -> None:
        if len(doc.tokens) == 0:
            return
        score = split_score(self.seed, doc.key)
        if score < self.eval_fraction:
            self._write("eval", doc)
            self._release_held("train")
        elif self.eval_fraction > 0 and self.documents["eval"] == 0:
            if self._held is None or score < self._held[0]:
                self._release_held("train")
                self._held = (score, doc)
            else:
                self._write("train", doc)
        else:
            self._write("train", doc)

    def close(self) -> dict[str, list[ShardInfo]]:
        self._release_held("eval")
        if self.documents["train"] == 0:
            raise DataError("the corpus has no training documents (is it empty?)")
        return {split: writer.close() for split, writer in self.writers.items()}

    def stats(self) -> dict[str, object]:
        return {
            "documents": self.documents["train"] + self.documents["eval"],
            "train_documents": self.documents["train"],
            "eval_documents": self.documents["eval"],
            "train_tokens": self.tokens["train"],
            "eval_tokens": self.tokens["eval"],
            "unigram_entropy": unigram_entropy(self.counts),
        }

    def _release_held(self, split: str) -> None:
        if self._held is not None:
            self._write(split, self._held[1])
            self._held = None

    def _write(self, split: str, doc: Encoded) -> None:
        self.writers[split].write(doc)
        self.documents[split] += 1
        self.tokens[split] += len(doc.tokens)
        if split == "train":
            self.counts += np.bincount(doc.tokens, minlength=len(self.counts))


def split_score(seed: int, key: str) -> float:
    """A uniform number in [0, 1) determined by (seed, key): the document's split lottery."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats/token of the token frequency distribution ``counts``."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


# --- cached preparation for the trainer -----------------------------------------------------


def ensure_prepared(
    source: str, cache_dir: Path, vocab_size: int, workers: int = 2, *, progress: bool = True
) -> Path:
    """Prepare ``source`` into ``cache_dir/<source>-v<vocab>-tok<format>`` once and return that folder.

    An exclusive file lock serializes concurrent callers (ranks, jobs sharing a cache): the first
    prepares, the others wait and then reuse its complete output.
    """
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"{_cache_name(source)}-v{vocab_size}-tok{TOKENIZER_FORMAT}"
    with (cache_dir / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_prepared(out, source):
            log.info("preparing %s into %s (first use; cached afterwards)", source, out)
            manifest = prepare(source, out, vocab_size=vocab_size, workers=workers,
                               progress=progress)
            log.info("prepared %s: %d documents, %d tokens", source,
                     manifest.stats["documents"], manifest.stats["train_tokens"])
    return out


def _cache_name(source: str) -> str:
    slug = slugify(source)
    if slug == source:
        return slug
    return f"{slug}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"


def _is_prepared(out: Path, source: str) -> bool:
    try:
        manifest = Manifest.load(out)
        manifest.check_files()
    except DataError:
        return False
    return manifest.source == source
