"""``megatrain-prepare --verify DIR|URL``: check a prepared corpus against its manifest.

Each shard must exist, have the manifest's size and sha256, and parse as a tar whose samples
(``<key>.json`` + ``<key>.tokens.npy``, 1-d unsigned ids below the vocabulary size) add up to the
manifest's sample and token counts; task data's samples also have their format's member, checked
against the tokens (``mask.npy``: uint8, as long as the tokens, some target; ``cls``: a label
index of the manifest's list; ``target.npy``: ids like the tokens, not empty). The tokenizer file
must match its recorded sha256. The hash
alone catches any change; the content checks say what is wrong with a shard that fails it. A
corpus at a URL is read through ``megatrain.data.storage`` (each shard bounded by its size in the
manifest).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatrain.data import storage
from megatrain.data.manifest import MAX_SHARD_BYTES, MAX_TOKENIZER_BYTES, Manifest, ShardInfo
from megatrain.data.tar import npy_tokens, tar_samples

MAX_PROBLEMS = 5
TASK_MEMBERS = {"sft": "mask.npy", "cls": "cls", "seq2seq": "target.npy"}
"""The member each task format's samples carry beside json and tokens.npy."""


@dataclass
class Check:
    """The verdict on one file of a prepared folder."""

    name: str
    kind: str  # "train", "eval" or "tokenizer"
    problems: list[str] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        """One report line: status, file, what was found (and what is wrong)."""
        status = "ok " if self.ok else "BAD"
        found = "" if self.kind == "tokenizer" else f"  {self.samples} samples  {self.tokens:,} tokens"
        problems = "" if self.ok else "  " + "; ".join(self.problems)
        return f"{status}  {self.kind:<9} {self.name}{found}{problems}"


def verify(root: str | Path) -> list[Check]:
    """Every shard and the tokenizer of the folder or URL ``root``, checked; DataError if it
    has no readable manifest."""
    manifest = Manifest.load(root)
    checks = [_check_tokenizer(manifest)]
    for split, shards in manifest.splits.items():
        checks += [_check_shard(shard, split, manifest.vocab_size, manifest.task)
                   for shard in shards]
    return checks


def _check_tokenizer(manifest: Manifest) -> Check:
    name = manifest.tokenizer["file"]
    check = Check(name, "tokenizer")
    expected = manifest.tokenizer.get("sha256")
    data = _read(storage.join(manifest.root, name), MAX_TOKENIZER_BYTES, check)
    if data is not None and expected and hashlib.sha256(data).hexdigest() != expected:
        check.problems.append("sha256 differs from the manifest")
    return check


def _check_shard(shard: ShardInfo, split: str, vocab_size: int,
                 task: dict[str, Any] | None = None) -> Check:
    check = Check(shard.name, split)
    # At a URL the manifest's size bounds the read; a local file's size is reported as it is.
    remote = storage.is_url(shard.url)
    data = _read(shard.url, shard.nbytes if remote and shard.nbytes else MAX_SHARD_BYTES, check)
    if data is None:
        return check
    if shard.nbytes is not None and len(data) != shard.nbytes:
        check.problems.append(f"size {len(data):,} bytes, manifest says {shard.nbytes:,}")
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        check.problems.append("sha256 differs from the manifest")
    _check_content(data, vocab_size, check, task)
    if check.samples != shard.samples:
        check.problems.append(f"{check.samples} samples, manifest says {shard.samples}")
    if check.tokens != shard.tokens:
        check.problems.append(f"{check.tokens:,} tokens, manifest says {shard.tokens:,}")
    return check


def _read(location: str, limit: int, check: Check) -> bytes | None:
    """The file or object at ``location``, or None with the problem noted: missing, larger than
    ``limit`` bytes (the manifest's size), or unreadable after retries."""
    try:
        return storage.read_bytes(location, limit=limit)
    except storage.StorageError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            check.problems.append("missing")
        elif exc.__cause__ is None:
            check.problems.append(f"larger than the manifest's {limit:,} bytes")
        else:
            check.problems.append(f"unreadable ({exc})")
        return None


def _check_content(data: bytes, vocab_size: int, check: Check,
                   task: dict[str, Any] | None = None) -> None:
    """Count samples and tokens, noting (a few) malformed samples."""
    samples, stop = tar_samples(data)
    if stop:
        check.problems.append(f"unreadable tar ({stop})")
    for key, parts in samples:
        check.samples += 1
        problem = _sample_problem(key, parts, vocab_size, check, task)
        if problem and len(check.problems) < MAX_PROBLEMS:
            check.problems.append(problem)


def _sample_problem(key: str, parts: dict[str, memoryview], vocab_size: int,
                    check: Check, task: dict[str, Any] | None = None) -> str:
    extra = TASK_MEMBERS[task["format"]] if task else None
    expected = {"json", "tokens.npy"} | ({extra} if extra else set())
    if set(parts) != expected:
        return f"sample {key} has members {sorted(parts)}, expected {' + '.join(sorted(expected))}"
    try:
        tokens = npy_tokens(parts["tokens.npy"])
    except ValueError as exc:
        return f"sample {key}: unreadable tokens.npy ({exc})"
    check.tokens += len(tokens)
    if len(tokens) and int(tokens.max()) >= vocab_size:
        return f"sample {key} has token id {int(tokens.max())} >= vocab size {vocab_size}"
    if extra:
        problem = _task_member_problem(extra, parts[extra], tokens, vocab_size, task)
        return f"sample {key}: {problem}" if problem else ""
    return ""


def _task_member_problem(name: str, data: memoryview, tokens: np.ndarray, vocab_size: int,
                         task: dict[str, Any]) -> str:
    """What is wrong with a task sample's extra member, or ""."""
    if name == "cls":
        text = bytes(data).decode("ascii", "replace")
        labels = len(task.get("labels") or [])
        if not text.isdigit() or int(text) >= labels:
            return f"cls {text!r} is not a label index below {labels}"
        return ""
    if name == "target.npy":
        try:
            target = npy_tokens(data)
        except ValueError as exc:
            return f"unreadable target.npy ({exc})"
        if not len(target) or target.dtype != tokens.dtype or int(target.max()) >= vocab_size:
            return f"target.npy must hold 1 to n {tokens.dtype} ids below {vocab_size}"
        return ""
    try:
        mask = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        return f"unreadable mask.npy ({exc})"
    if mask.dtype != np.uint8 or mask.shape != tokens.shape or not mask.any():
        return (f"mask.npy is {mask.dtype}{list(mask.shape)}, expected uint8[{len(tokens)}] "
                "with a target")
    return ""
