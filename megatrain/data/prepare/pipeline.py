"""Raw corpus → tokenizer + tokenized WebDataset shards + ``manifest.json``.

The pipeline, in the main process unless noted::

    sources (stream) → Cleaner (normalize, min length, dedup) → SplitRouter (train / eval)
      → skip what finished shards already hold → tokenize (``workers`` processes, in order)
      → ShardWriter per split (fixed tar headers) → journal line per shard → manifest.json

Documents are tokenized in worker processes with a bounded number of chunks in flight (memory
does not grow with the corpus) and results are consumed in submission order, so the shards are
byte-identical for the same inputs, options and tokenizer, whatever the worker count. Routing and
cleaning never look at tokens, so a rerun after an interruption replays them cheaply and only
tokenizes the documents that belong to unfinished shards (see ``journal.py``).

``out`` may be a URL (``s3://bucket/prefix``, any writable fsspec store), written through a local
staging folder (``remote_out.py``).

Task data (``format`` sft, cls or seq2seq: ``tasks.py``) runs through the same pipeline: its rows
are checked in a first pass (nothing is written before every row fits), then travel as documents
whose text is the checked row, and a :class:`~megatrain.data.prepare.tasks.TaskEncoder` in the
workers turns each into a sample with the task's extra members.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from megatrain.data import storage
from megatrain.data.manifest import (
    MANIFEST,
    SPLITS,
    Manifest,
    ShardInfo,
    sha256_file,
)
from megatrain.data.prepare.clean import Cleaner, CleanOptions
from megatrain.data.prepare.journal import JOURNAL, Journal, JournalShard
from megatrain.data.prepare.remote_out import RemoteOut, storage_call
from megatrain.data.prepare.shard_writer import (
    TMP_SUFFIX,
    Encoded,
    ShardDone,
    ShardLimit,
    ShardWriter,
    token_counts,
    token_dtype,
)
from megatrain.data.prepare.sources import (
    DEFAULT_TEXT_FIELD,
    STDLIB,
    Document,
    Location,
    file_documents,
    file_stamp,
    resolve_files,
    slugify,
)
from megatrain.data.prepare.tasks import (
    TaskEncoder,
    TaskOptions,
    check_tokenizer,
    scan,
    task_documents,
    task_options,
)
from megatrain.data.prepare.train_tokenizer import (
    DEFAULT_MAX_SENTENCES,
    TOKENIZER_FORMAT,
    TOKENIZER_TYPES,
    train_tokenizer,
)
from megatrain.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    find_tokenizer_file,
    load_tokenizer,
)
from megatrain.data.tokenizer.hf_tokenizer import CONFIG_FILE as HF_CONFIG_FILE
from megatrain.errors import ConfigError, DataError

DEFAULT_SHARD_TOKENS = 1_000_000
CHUNK_DOCS = 256
CHUNK_CHARS = 1 << 18
IN_FLIGHT_PER_WORKER = 4

log = logging.getLogger("megatrain")


@dataclass(frozen=True)
class PrepareOptions:
    """Everything that decides the output bytes (the worker count and progress bar do not)."""

    source: str
    tokenizer: str | None = None
    vocab_size: int = 8192
    tokenizer_type: str = "bpe"
    tokenizer_sample: int = DEFAULT_MAX_SENTENCES
    eval_fraction: float = 0.01
    shard_tokens: int | None = None
    shard_bytes: int | None = None
    seed: int = 0
    text_field: str = DEFAULT_TEXT_FIELD
    clean: CleanOptions = field(default_factory=CleanOptions)
    task: TaskOptions | None = None
    """Task data (sft, cls, seq2seq) instead of pretraining text."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1], got {self.eval_fraction}")
        if self.eval_only and self.tokenizer is None:
            raise ConfigError("an eval-only folder (eval_fraction 1: a fixed validation set) is "
                              "read by a model trained on other data: give --tokenizer (the "
                              "training corpus's or the checkpoint's)")
        if self.shard_tokens is not None and self.shard_bytes is not None:
            raise ConfigError("give shard_tokens or shard_bytes, not both")
        for name in ("shard_tokens", "shard_bytes", "tokenizer_sample"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ConfigError(
                f"tokenizer type must be one of {', '.join(TOKENIZER_TYPES)}, "
                f"got {self.tokenizer_type!r}"
            )
        if not self.text_field:
            raise ConfigError("text_field must name a JSONL field / Parquet column")
        if self.task is not None:
            self._check_task()

    def _check_task(self) -> None:
        """Task text is kept as written: no normalization, no length filter (``dedup`` drops
        exact duplicate rows), and rows are read by their field names."""
        clean = self.clean
        if clean.normalize != "none" or clean.min_chars:
            raise ConfigError(f"--normalize and --min-chars do not apply to --format "
                              f"{self.task.format}: task text is kept as written")
        if self.text_field != DEFAULT_TEXT_FIELD:
            raise ConfigError(f"--text-field does not apply to --format {self.task.format}: "
                              "rows are read by their field names")

    @property
    def eval_only(self) -> bool:
        """Every document goes to the eval split (``data.eval``, ``megatrain-eval --data``)."""
        return self.eval_fraction == 1.0

    @property
    def limit(self) -> ShardLimit:
        if self.shard_bytes is not None:
            return ShardLimit(nbytes=self.shard_bytes)
        return ShardLimit(tokens=self.shard_tokens or DEFAULT_SHARD_TOKENS)

    def to_json(self) -> dict[str, object]:
        """The options recorded in the manifest (a given tokenizer by content, not path)."""
        data = asdict(self)
        del data["source"], data["tokenizer"]
        if self.task is None:  # pretraining options read exactly as before
            del data["task"]
        if self.tokenizer is not None:  # training options do not apply to a given tokenizer
            for name in ("vocab_size", "tokenizer_type", "tokenizer_sample"):
                del data[name]
        return data


def prepare(
    source: str,
    out: str | Path,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    tokenizer_type: str = "bpe",
    tokenizer_sample: int = DEFAULT_MAX_SENTENCES,
    eval_fraction: float = 0.01,
    shard_tokens: int | None = None,
    shard_bytes: int | None = None,
    workers: int = 2,
    seed: int = 0,
    text_field: str = DEFAULT_TEXT_FIELD,
    normalize: str = "none",
    min_chars: int = 0,
    dedup: bool = False,
    progress: bool = True,
    format: str | None = None,
    template: str | None = None,
    labels: Sequence[str] | str | None = None,
) -> Manifest:
    """Tokenize ``source`` into ``out`` (a folder, or a URL written through a local staging
    folder); returns the manifest, which is written last.

    ``format`` (sft, cls, seq2seq) prepares task data for fine-tuning instead of pretraining
    text: ``template`` renders sft rows, ``labels`` fixes a cls label list (a sequence, or a
    comma-separated string), see ``tasks.py``.
    Rerunning into the same ``out`` with the same inputs and options continues an interrupted
    run: finished shards that still verify are kept, the rest is written.
    """
    options = PrepareOptions(
        source, tokenizer, vocab_size, tokenizer_type, tokenizer_sample, eval_fraction,
        shard_tokens, shard_bytes, seed, text_field, CleanOptions(normalize, min_chars, dedup),
        task_options(format, template, labels),
    )
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    return _Run(options, out, workers, progress).run()


class _Run:
    """One prepare: resume bookkeeping, tokenizer, then the document pipeline."""

    def __init__(self, options: PrepareOptions, out: str | Path, workers: int,
                 progress: bool) -> None:
        self.options, self.workers, self.progress = options, workers, progress
        self.remote = RemoteOut(str(out)) if storage.is_url(out) else None
        self.out = self.remote.staging if self.remote else storage.local_path(out)
        """Where files are written: the output folder, or the staging folder of a URL."""
        self.where = self.remote.display if self.remote else str(self.out)
        self.files: list[tuple[Location, str]] = []  # resolved by run()
        self.encoder: TaskEncoder | None = None  # task data: set by run()

    def run(self) -> Manifest:
        self.files = files = resolve_files(self.options.source)  # fail early on a bad source
        given = _given_tokenizer(self.options.tokenizer)
        self.encoder = self._task_encoder(given)
        fingerprint = _fingerprint(self.options, files, given,
                                   self.encoder.fingerprint() if self.encoder else None)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / MANIFEST).unlink(missing_ok=True)  # a crash must not leave a stale index
        if self.remote:
            self.remote.start(self.out / JOURNAL)
        journal = Journal.open(self.out, fingerprint)
        if self.remote:  # fails now, not after training a tokenizer, if the URL can't be written
            self.remote.upload(journal.path)
        if not journal.resumed:
            _clear_outputs(self.out, keep=given)
        tok = self._tokenizer(journal, given)
        if self.encoder:
            check_tokenizer(tok, self.options.task)
        done, counts = self._verified_shards(journal, tok.vocab_size)
        _remove_unlisted_shards(self.out, done)
        if self.remote:
            self.remote.remove_unlisted(done)
            self.remote.upload(journal.path)
        if any(done.values()):
            log.info("resuming %s: %s already finished", self.where,
                     ", ".join(f"{len(v)} {k} shards" for k, v in done.items()))
        writer = CorpusWriter(self.out, tok.vocab_size, self.options.limit, done,
                              self._on_shard(journal), counts)
        cleaner = Cleaner(self.options.clean)
        self._tokenize(cleaner, writer, tok.path, {s: sum(j.inputs for j in v)
                                                    for s, v in done.items()})
        splits = writer.close(need_train=not self.options.eval_only)
        stats = writer.stats() | cleaner.stats()
        root = self.remote.url if self.remote else self.out
        if self.remote:
            splits = {split: [dataclasses.replace(s, url=storage.join(root, s.name))
                              for s in shards] for split, shards in splits.items()}
        task = self.encoder.manifest_entry(writer.empty) if self.encoder else None
        _log_stats(stats, task)
        manifest = Manifest(root, self.options.source, self.options.seed, _tokenizer_entry(tok),
                            splits, stats, self.options.to_json(), task=task)
        self._save(manifest)
        return manifest

    def _task_encoder(self, given: Tokenizer | None) -> TaskEncoder | None:
        """For task data: every row checked (and a cls label list collected) before anything is
        written, and the given tokenizer checked for what the format needs."""
        task = self.options.task
        if task is None:
            return None
        labels = scan(self.files, task)
        if given is not None:
            check_tokenizer(given, task)
        return TaskEncoder.create(task, labels, given)

    def _save(self, manifest: Manifest) -> None:
        """Write the manifest, last; a URL's staging folder is then no longer needed."""
        if self.remote is None:
            manifest.save()
            return
        storage_call(lambda: manifest.save())
        shutil.rmtree(self.out, ignore_errors=True)

    def _tokenizer(self, journal: Journal, given: Tokenizer | None) -> Tokenizer:
        """The journal's tokenizer when its file is intact, else a copied or trained one."""
        recorded = journal.tokenizer
        if recorded is not None:
            path = self.out / recorded["file"]
            # at a URL, the copy there is the one the manifest will name
            present = self.remote.fetch_tokenizer(path) if self.remote else path.is_file()
            if present and sha256_file(path) == recorded["sha256"]:
                return load_tokenizer(path)
        path = given.save(self.out) if given else self._train_tokenizer()
        tok = load_tokenizer(path)
        if self.remote:
            for file in (path, *tok.companion_files()):
                self.remote.upload(file)
        journal.set_tokenizer({"file": path.name, "sha256": sha256_file(path)})
        if self.remote:
            self.remote.upload(journal.path)
        return tok

    def _verified_shards(
        self, journal: Journal, vocab_size: int
    ) -> tuple[dict[str, list[JournalShard]], np.ndarray]:
        """Each split's longest prefix of journaled shards whose bytes (the local file, or the
        object at the URL) have their size and sha256; and the id counts of the kept train
        shards (the statistics of a resumed run cover them)."""
        kept: dict[str, list[JournalShard]] = {}
        counts = np.zeros(vocab_size, dtype=np.int64)
        for split, shards in journal.shards.items():
            kept[split] = []
            for shard in shards:
                data = self._shard_bytes(shard.info)
                if data is None or hashlib.sha256(data).hexdigest() != shard.info.sha256:
                    log.warning("%s: %s and later %s shards will be written again",
                                self.where, shard.info.name, split)
                    break
                kept[split].append(shard)
                if split == "train":
                    counts += token_counts(data, shard.info.name, vocab_size)
        journal.keep(kept)
        return kept, counts

    def _shard_bytes(self, info: ShardInfo) -> bytes | None:
        """A finished shard's bytes if it is there with its recorded size, else None."""
        if self.remote:
            return self.remote.read(info.name, info.nbytes)
        path = info.path
        if not path.is_file() or path.stat().st_size != info.nbytes:
            return None
        return path.read_bytes()

    def _on_shard(self, journal: Journal) -> ShardDone:
        """What follows a shard's rename into place: for a URL its upload (and the local copy's
        removal), then the journal line — and the journal's upload, so that the journal at the
        URL only ever lists shards the URL holds."""
        def done(split: str, info: ShardInfo, inputs: int) -> None:
            if self.remote:
                self.remote.upload(info.path)
                info.path.unlink()
            journal.add_shard(split, info, inputs)
            if self.remote:
                self.remote.upload(journal.path)
        return done

    def _documents(self) -> Iterator[Document]:
        o = self.options
        if o.task is not None:
            return task_documents(self.files, o.task)
        return file_documents(self.files, stdlib=o.source == STDLIB, text_field=o.text_field)

    def _train_tokenizer(self) -> Path:
        o = self.options
        docs = Cleaner(o.clean)(self._documents())
        encoder = self.encoder
        texts = ((t for d in docs for t in encoder.texts(d)) if encoder
                 else (d.text for d in docs))
        return train_tokenizer(texts, self.out / SentencePieceTokenizer.file_name, o.vocab_size, model_type=o.tokenizer_type,
                               threads=self.workers, max_sentences=o.tokenizer_sample, seed=o.seed)

    def _tokenize(
        self, cleaner: Cleaner, writer: CorpusWriter, model: Path, skip: dict[str, int]
    ) -> None:
        o = self.options
        docs = cleaner(self._documents())
        routed = SplitRouter(o.eval_fraction, o.seed).route(docs)
        pending = _skip_finished(routed, skip)
        bar = tqdm(desc="tokenizing", unit="doc", file=sys.stderr,
                   disable=not (self.progress and sys.stderr.isatty()))
        with bar:
            for encoded in encode_documents(pending, model, self.workers, self.encoder):
                writer.add(encoded)
                bar.update()


def _given_tokenizer(tokenizer: str | None) -> Tokenizer | None:
    """A ``--tokenizer`` (a model, a tokenizer.json, a folder with either — a prepared corpus, a
    checkpoint —, or a run or checkpoints folder: its latest checkpoint's), loaded: DataError now
    if it is not a tokenizer."""
    if tokenizer is None:
        return None
    path = Path(tokenizer).expanduser()
    try:
        return load_tokenizer(path)
    except DataError:
        if not path.is_dir():
            raise
        return load_tokenizer(_checkpoint_folder(path))


def _checkpoint_folder(path: Path) -> Path:
    """The checkpoint a run or checkpoints folder names (fine-tuning reuses the pretraining
    tokenizer); DataError if ``path`` holds no tokenizer and names no checkpoint."""
    from megatrain.training.checkpoint import resolve_checkpoint_path  # torch: only if needed

    try:
        checkpoint = resolve_checkpoint_path(path)
        find_tokenizer_file(checkpoint)
    except (ConfigError, DataError) as exc:
        raise DataError(f"--tokenizer {path} holds no tokenizer.model or tokenizer.json and is no "
                        f"megatrain checkpoint, checkpoints or run folder with one ({exc})") from exc
    return checkpoint


def _fingerprint(options: PrepareOptions, files: list[tuple[Location, str]],
                 given: Tokenizer | None, task: dict[str, Any] | None = None) -> str:
    """A hash of what decides the output: the files (name, size, mtime; a URL's size and
    version), options, tokenizer, and for task data the label list and a chat template."""
    digest = hashlib.sha256()
    for path, label in files:
        digest.update(f"{label}\0{file_stamp(path)}\n".encode())
    config = {
        "source": options.source,
        "options": options.to_json(),
        "tokenizer": sha256_file(given.path) if given else None,
        "files": digest.hexdigest(),
    }
    if task is not None:
        config["task"] = task
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _shard_files(out: Path) -> Iterator[Path]:
    patterns = [f"{split}-*.tar{tmp}" for split in SPLITS for tmp in ("", TMP_SUFFIX)]
    return itertools.chain.from_iterable(out.glob(p) for p in patterns)


def _clear_outputs(out: Path, keep: Tokenizer | None) -> None:
    """A fresh start: remove an earlier run's shards and tokenizer (unless it is the given one)."""
    for old in _shard_files(out):
        old.unlink()
    kept = {f.resolve() for f in [keep.path, *keep.companion_files()]} if keep else set()
    for name in (SentencePieceTokenizer.file_name, HFTokenizer.file_name, HF_CONFIG_FILE):
        if (out / name).resolve() not in kept:
            (out / name).unlink(missing_ok=True)


def _remove_unlisted_shards(out: Path, done: dict[str, list[JournalShard]]) -> None:
    """Remove half-written (``.tmp``) and unverified shard files: they will be rewritten."""
    keep = {s.info.name for shards in done.values() for s in shards}
    for path in _shard_files(out):
        if path.name not in keep:
            path.unlink()


def _tokenizer_entry(tok: Tokenizer) -> dict[str, object]:
    if tok.eos_id < 0:
        raise DataError(f"tokenizer {tok.path} has no end-of-text token; the stream needs one")
    return {
        "file": tok.path.name,
        "sha256": sha256_file(tok.path),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
    }


def _log_stats(stats: dict[str, object], task: dict[str, Any] | None = None) -> None:
    if task is not None:
        log.info(
            "read %d %s rows; dropped %d duplicate, %d with no target tokens; wrote %d (%d train "
            "/ %d eval), %d tokens", stats["documents_read"], task["format"],
            stats["dropped_duplicate"], task["dropped"], stats["documents"],
            stats["train_documents"], stats["eval_documents"],
            stats["train_tokens"] + stats["eval_tokens"],
        )
        return
    log.info(
        "read %d documents; dropped %d short, %d duplicate, %d empty; wrote %d (%d train / %d "
        "eval), %d tokens", stats["documents_read"], stats["dropped_short"],
        stats["dropped_duplicate"], stats["dropped_empty"], stats["documents"],
        stats["train_documents"], stats["eval_documents"],
        stats["train_tokens"] + stats["eval_tokens"],
    )


# --- routing --------------------------------------------------------------------------------


class SplitRouter:
    """Decides each document's split from its key alone (no tokens needed, so a resumed run can
    replay it cheaply).

    A document is held for eval when ``hash(seed, key) < eval_fraction``. So that a small corpus
    still gets an eval split, the lowest-hash train document is held back until the first eval
    document appears; if none does, it becomes the eval split.
    """

    def __init__(self, eval_fraction: float, seed: int) -> None:
        self.eval_fraction, self.seed = eval_fraction, seed

    def route(self, docs: Iterable[Document]) -> Iterator[tuple[str, Document]]:
        """``(split, document)`` in the order the documents are written."""
        held: tuple[float, Document] | None = None
        seen_eval = False
        for doc in docs:
            score = split_score(self.seed, doc.key)
            if score < self.eval_fraction:
                seen_eval = True
                yield "eval", doc
                if held is not None:
                    yield "train", held[1]
                    held = None
            elif self.eval_fraction > 0 and not seen_eval:
                if held is None or score < held[0]:
                    if held is not None:
                        yield "train", held[1]
                    held = (score, doc)
                else:
                    yield "train", doc
            else:
                yield "train", doc
        if held is not None:
            yield "eval", held[1]


def _skip_finished(
    routed: Iterable[tuple[str, Document]], skip: dict[str, int]
) -> Iterator[tuple[str, Document]]:
    """Drop the first ``skip[split]`` documents of each split: finished shards hold them."""
    left = dict(skip)
    for split, doc in routed:
        if left.get(split, 0) > 0:
            left[split] -= 1
        else:
            yield split, doc


def split_score(seed: int, key: str) -> float:
    """A uniform number in [0, 1) determined by (seed, key): the document's split lottery."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# --- tokenization in worker processes -------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None
_worker_encoder: TaskEncoder | None = None


def _init_worker(model: str, pool: bool = False, encoder: TaskEncoder | None = None) -> None:
    global _worker_tokenizer, _worker_encoder
    if pool:  # one thread per worker process, also for Hugging Face tokenizers (rayon)
        os.environ["RAYON_NUM_THREADS"] = "1"
    _worker_tokenizer = load_tokenizer(model)
    _worker_encoder = encoder


def _encode_chunk(chunk: list[tuple[str, Document]]) -> list[Encoded]:
    """Tokenize a chunk in a worker (or in-process for one worker), on one thread: the workers
    are the parallelism. Task rows go through the task encoder."""
    tok = _worker_tokenizer
    assert tok is not None, "worker not initialized"
    if _worker_encoder is not None:
        return _worker_encoder.encode(tok, chunk)
    dtype = token_dtype(tok.vocab_size)
    ids = tok.encode_arrays([doc.text for _, doc in chunk], threads=1)
    return [
        Encoded(split, d.key, d.source, len(d.text.encode("utf-8", "surrogatepass")),
                t.astype(dtype))
        for (split, d), t in zip(chunk, ids)
    ]


def encode_documents(
    docs: Iterable[tuple[str, Document]], model: Path, workers: int,
    encoder: TaskEncoder | None = None,
) -> Iterator[Encoded]:
    """Tokenized documents in input order (task samples when ``encoder`` is given); ``workers``
    processes, at most a few chunks queued."""
    chunks = _chunks(docs)
    if workers == 1:
        _init_worker(str(model), encoder=encoder)
        for chunk in chunks:
            yield from _encode_chunk(chunk)
        return
    # Spawned, not forked: prepare also runs inside the trainer (a corpus prepared on first use),
    # whose threads (torch, DeepSpeed, logging) may hold locks a forked child would inherit
    # locked and wait on forever.
    context = mp.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker,
                      initargs=(str(model), True, encoder)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def _chunks(docs: Iterable[tuple[str, Document]]) -> Iterator[list[tuple[str, Document]]]:
    """Groups of at most ``CHUNK_DOCS`` documents or about ``CHUNK_CHARS`` characters."""
    chunk: list[tuple[str, Document]] = []
    chars = 0
    for item in docs:
        chunk.append(item)
        chars += len(item[1].text)
        if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


# --- writing shards -------------------------------------------------------------------------


class CorpusWriter:
    """Sends tokenized documents to their split's shards and keeps the corpus statistics."""

    def __init__(
        self, out: Path, vocab_size: int, limit: ShardLimit,
        done: dict[str, list[JournalShard]], on_done: ShardDone, counts: np.ndarray,
    ) -> None:
        """``done``: the finished shards of an earlier run; ``counts``: the id counts of its
        train shards."""
        self.writers = {
            split: ShardWriter(out, split, limit, [s.info for s in done[split]], on_done)
            for split in SPLITS
        }
        self.documents = {s: sum(j.info.samples for j in done[s]) for s in SPLITS}
        self.tokens = {s: sum(j.info.tokens for j in done[s]) for s in SPLITS}
        self.counts = counts.copy()
        self.empty = sum(j.inputs - j.info.samples for s in SPLITS for j in done[s])
        """Routed documents that had no tokens (task rows: nothing to learn from), the finished
        shards' included."""

    def add(self, doc: Encoded) -> None:
        if len(doc.tokens) == 0:  # text the tokenizer normalizes away entirely
            self.empty += 1
            self.writers[doc.split].skip()
            return
        self.writers[doc.split].write(doc)
        self.documents[doc.split] += 1
        self.tokens[doc.split] += len(doc.tokens)
        if doc.split == "train":
            self.counts += np.bincount(doc.tokens, minlength=len(self.counts))

    def close(self, need_train: bool = True) -> dict[str, list[ShardInfo]]:
        """The shards of each split; DataError for a corpus without training documents (unless
        eval-only: then without eval documents)."""
        needed = "train" if need_train else "eval"
        if self.documents[needed] == 0:
            raise DataError(f"the corpus has no {'training' if need_train else 'eval'} "
                            "documents (is it empty?)")
        return {split: writer.close() for split, writer in self.writers.items()}

    def stats(self) -> dict[str, object]:
        return {
            "documents": self.documents["train"] + self.documents["eval"],
            "train_documents": self.documents["train"],
            "eval_documents": self.documents["eval"],
            "train_tokens": self.tokens["train"],
            "eval_tokens": self.tokens["eval"],
            "dropped_empty": self.empty,
            "unigram_entropy": unigram_entropy(self.counts),
        }


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
    out = cache_dir / f"{_cache_name(source)}-v{vocab_size}-tok{TOKENIZER_FORMAT}"
    return prepare_once(source, out, vocab_size=vocab_size, workers=workers, progress=progress)


def prepare_once(source: str, out: Path, **options: Any) -> Path:
    """``prepare(source, out, **options)`` unless ``out`` holds it complete already; ranks and
    jobs sharing a cache take turns on a file lock beside ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_prepared(out, source):
            log.info("preparing %s into %s (first use; cached afterwards)", source, out)
            manifest = prepare(source, out, **options)
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
