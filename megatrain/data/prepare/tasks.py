"""Task data for fine-tuning (``megatrain-prepare --format sft|cls|seq2seq``): rows → samples.

Rows are read as records (``sources.file_records``) and checked in the main process: a row that
does not fit the format is a DataError naming ``file:line`` (JSONL, 1-based) or ``file: row N
(0-based)`` (Parquet). A checked row travels through the pretraining pipeline as a
:class:`~megatrain.data.prepare.sources.Document` whose text is the row's canonical JSON (only the
fields the format uses), so routing, exact dedup, resume and ordered multi-process encoding are
the pipeline's own; :class:`TaskEncoder` turns it into an ``Encoded`` sample with the extra
members of the task-data contract (docs/data.md, "Task data"):

- ``sft``: ``tokens.npy`` the rendered conversation (no EOS), ``mask.npy`` (uint8, same length:
  0 = not a target, k = a token of the k-th assistant turn);
- ``cls``: ``tokens.npy`` = ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]``, ``cls`` = the label's
  index in the manifest's label list (ASCII decimal);
- ``seq2seq``: ``tokens.npy`` the input ids, ``target.npy`` the target ids (no EOS).

A row with nothing to learn from once tokenized — no target token (sft), an input or target
that encodes to no tokens (seq2seq), a text that encodes to no tokens (cls) — is dropped and
counted (``task.dropped``).

The label set is sorted (numerically when every label is an integer, else by code point), so it
does not depend on the order of the rows and integer labels keep their values as ids; ``labels``
fixes the set and its order instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatrain.data.manifest import TASK_FORMATS
from megatrain.data.prepare.shard_writer import Encoded, npy_bytes, token_dtype
from megatrain.data.prepare.sources import Document, Location, Record, record_documents
from megatrain.data.prepare.templates import (
    ROLES,
    Template,
    alpaca_pair,
    check_template,
    make_template,
    template_digest,
)
from megatrain.data.tokenizer import Tokenizer
from megatrain.errors import ConfigError, DataError

FORMATS = TASK_FORMATS
DEFAULT_TEMPLATE = "plain"
MAX_TURNS = 255
"""Assistant turns a conversation may have: their numbers must fit ``mask.npy``'s uint8."""
_INTEGER = re.compile(r"[+-]?\d+")
_SHAPES = {
    "sft": "{prompt, completion} or {messages: [{role, content}, ...]}",
    "cls": "{text, label} or {text_a, text_b, label}",
    "seq2seq": "{input, target}",
}


@dataclass(frozen=True)
class TaskOptions:
    """What a task prepare was asked for: the format, the sft template, a fixed label list."""

    format: str
    template: str | None = None
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown format {self.format!r}; valid formats: "
                              f"{', '.join(FORMATS)} (or none: pretraining text)")
        if self.format == "sft":
            object.__setattr__(self, "template", check_template(self.template or DEFAULT_TEMPLATE))
        elif self.template is not None:
            raise ConfigError(f"--template applies to --format sft, not {self.format}")
        if self.labels is not None:
            self._check_labels()

    def _check_labels(self) -> None:
        if self.format != "cls":
            raise ConfigError(f"--labels applies to --format cls, not {self.format}")
        labels = tuple(self.labels)
        object.__setattr__(self, "labels", labels)
        if not labels or any(not label for label in labels):
            raise ConfigError(f"--labels must name labels, separated by commas: got {labels}")
        if len(set(labels)) != len(labels):
            raise ConfigError(f"--labels names a label twice: {', '.join(labels)}")


def task_options(format: str | None, template: str | None = None,
                 labels: Sequence[str] | str | None = None) -> TaskOptions | None:
    """The options of a task prepare, or None for pretraining text (then template and labels
    must be unset). ``labels`` may be a comma-separated string (``--labels pos,neg``)."""
    if format is None:
        if template is not None or labels is not None:
            raise ConfigError("--template and --labels apply to task data: add --format "
                              f"{'|'.join(FORMATS)}")
        return None
    if isinstance(labels, str):
        labels = labels.split(",")
    return TaskOptions(format, template,
                       None if labels is None else tuple(label.strip() for label in labels))


# --- checking rows ---------------------------------------------------------------------------


def check_row(options: TaskOptions, record: Record) -> dict[str, Any]:
    """The fields ``options.format`` uses of a record, checked; DataError naming the record."""
    data, where = record.data, record.where
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object {_SHAPES[options.format]}, "
                        f"got {type(data).__name__}")
    if options.format == "sft":
        row = _sft_row(data, where)
        if options.template == "alpaca":
            alpaca_pair(row, where)  # a conversation Alpaca can't render fails here, up front
        return row
    if options.format == "cls":
        row = _cls_row(data, where)
        if options.labels is not None and row["label"] not in options.labels:
            raise DataError(f"{where}: label {row['label']!r} is not in --labels "
                            f"({', '.join(options.labels)})")
        return row
    return {name: _text(data, name, where, "seq2seq") for name in ("input", "target")}


def _text(data: dict[str, Any], name: str, where: str, what: str) -> str:
    """A required, non-empty string field."""
    if data.get(name) is None:
        raise DataError(f"{where}: missing {name!r} (a {what} row is {_SHAPES[what]})")
    value = data[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: {name!r} must be a string, got {type(value).__name__}")
    if not value:
        raise DataError(f"{where}: {name!r} is empty")
    return value


def _sft_row(data: dict[str, Any], where: str) -> dict[str, Any]:
    if data.get("messages") is None:
        return {name: _text(data, name, where, "sft") for name in ("prompt", "completion")}
    if data.get("prompt") is not None or data.get("completion") is not None:
        raise DataError(f"{where}: give 'messages' or 'prompt'/'completion', not both")
    messages = data["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        "{role, content} objects")
    checked = [_message(m, f"{where}: messages[{i}]") for i, m in enumerate(messages)]
    turns = sum(m["role"] == "assistant" for m in checked)
    if turns == 0:
        raise DataError(f"{where}: no assistant message (nothing to train on)")
    if turns > MAX_TURNS:
        raise DataError(f"{where}: {turns} assistant messages; at most {MAX_TURNS} are supported")
    return {"messages": checked}


def _message(message: Any, where: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise DataError(f"{where} must be a {{role, content}} object, got "
                        f"{type(message).__name__}")
    for name in ("role", "content"):
        if message.get(name) is None:
            raise DataError(f"{where}: missing {name!r}")
        if not isinstance(message[name], str):
            raise DataError(f"{where}: {name!r} must be a string, got "
                            f"{type(message[name]).__name__}")
    if message["role"] not in ROLES:
        raise DataError(f"{where}: unknown role {message['role']!r} (roles: {', '.join(ROLES)})")
    if not message["content"]:
        raise DataError(f"{where}: 'content' is empty")
    return {"role": message["role"], "content": message["content"]}


def _cls_row(data: dict[str, Any], where: str) -> dict[str, Any]:
    if data.get("text") is not None and data.get("text_a") is not None:
        raise DataError(f"{where}: give 'text' or 'text_a'/'text_b', not both")
    if data.get("text") is not None:
        row = {"text_a": _text(data, "text", where, "cls")}
    else:
        row = {name: _text(data, name, where, "cls") for name in ("text_a", "text_b")}
    row["label"] = _label(data.get("label"), where)
    return row


def _label(value: Any, where: str) -> str:
    """A label as its string: a non-empty string, or an integer written in decimal."""
    if value is None:
        raise DataError(f"{where}: missing 'label' (a cls row is {_SHAPES['cls']})")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: 'label' must be a string or an integer, got "
                        f"{type(value).__name__}")
    if value == "":
        raise DataError(f"{where}: 'label' is empty")
    return str(value)


def canonical(row: dict[str, Any]) -> str:
    """A checked row as a document's text: compact JSON with sorted keys, so two rows with the
    same fields are the same text (``--dedup`` drops exact duplicate rows)."""
    return json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def task_documents(files: list[tuple[Location, str]], options: TaskOptions) -> Iterator[Document]:
    """The checked rows of ``files`` as documents (text = :func:`canonical` row), in order."""
    return record_documents(files, lambda record: canonical(check_row(options, record)))


def label_set(rows: Iterable[Document], options: TaskOptions) -> tuple[str, ...]:
    """The label list of a cls corpus (index = label id): ``options.labels`` when given, else
    the labels of ``rows`` sorted — numerically when all are integers, else by code point."""
    seen = {json.loads(doc.text)["label"] for doc in rows}
    if options.labels is not None:
        return options.labels
    if all(_INTEGER.fullmatch(label) for label in seen):
        return tuple(sorted(seen, key=lambda label: (int(label), label)))
    return tuple(sorted(seen))


def scan(files: list[tuple[Location, str]], options: TaskOptions) -> tuple[str, ...]:
    """Check every row before anything is written (DataError at the first bad one); the label
    list for cls, () otherwise."""
    rows = task_documents(files, options)
    if options.format == "cls":
        return label_set(rows, options)
    for _ in rows:
        pass
    return ()


# --- encoding --------------------------------------------------------------------------------


def check_tokenizer(tok: Tokenizer, options: TaskOptions) -> None:
    """DataError if ``tok`` lacks a token the format needs (cls: [CLS] and [SEP])."""
    if options.format == "cls" and (tok.cls_id < 0 or tok.sep_id < 0):
        missing = [name for name, i in (("[CLS]", tok.cls_id), ("[SEP]", tok.sep_id)) if i < 0]
        raise DataError(f"--format cls needs the tokenizer's [CLS] and [SEP] tokens; {tok.path} "
                        f"has no {' or '.join(missing)}")


@dataclass
class TaskEncoder:
    """Turns checked rows into samples with the contract's extra members, in worker processes
    (it is pickled to them; a chat template compiles once in each)."""

    options: TaskOptions
    labels: tuple[str, ...] = ()
    template: Template | None = None
    label_ids: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.label_ids = {label: i for i, label in enumerate(self.labels)}

    @classmethod
    def create(cls, options: TaskOptions, labels: tuple[str, ...],
               given: Tokenizer | None) -> TaskEncoder:
        """The encoder of a prepare; ``given``: the ``--tokenizer`` (the chat template's)."""
        template = make_template(options.template, given) if options.format == "sft" else None
        return cls(options, labels, template)

    def fingerprint(self) -> dict[str, Any]:
        """What decides the samples beyond the options: the label list, a chat template."""
        return {"labels": list(self.labels),
                "template": None if self.template is None else template_digest(self.template)}

    def manifest_entry(self, dropped: int) -> dict[str, Any]:
        """The manifest's ``task`` dict."""
        entry: dict[str, Any] = {"format": self.options.format,
                                 "template": self.options.template}
        if self.options.format == "cls":
            entry["labels"] = list(self.labels)
        entry["dropped"] = dropped
        return entry

    def texts(self, doc: Document) -> list[str]:
        """The texts of a row a tokenizer is trained on: an sft row rendered (``plain`` or
        ``alpaca``: ``chat`` needs a given tokenizer), a cls or seq2seq row's fields."""
        row = json.loads(doc.text)
        if self.options.format == "sft":
            return ["".join(text for text, _ in self.template.render(row, doc.where))]
        return [v for k, v in sorted(row.items()) if k != "label"]

    def encode(self, tok: Tokenizer, chunk: list[tuple[str, Document]]) -> list[Encoded]:
        """The chunk's samples, in order: every piece of every row tokenized in one batch."""
        rows = [json.loads(doc.text) for _, doc in chunk]
        rendered = [self._pieces(row, doc.where) for row, (_, doc) in zip(rows, chunk)]
        ids = iter(tok.encode_arrays([text for pieces in rendered for text, _ in pieces],
                                     threads=1))
        dtype = token_dtype(tok.vocab_size)
        out = []
        for (split, doc), row, pieces in zip(chunk, rows, rendered):
            arrays = [next(ids).astype(dtype) for _ in pieces]
            nbytes = sum(len(text.encode("utf-8", "surrogatepass")) for text, _ in pieces)
            tokens, members = self._sample(tok, row, pieces, arrays, dtype)
            out.append(Encoded(split, doc.key, doc.source, nbytes, tokens, members))
        return out

    def _pieces(self, row: dict[str, Any], where: str) -> list[tuple[str, int]]:
        """(text, turn) pieces: sft through its template; cls ``a`` (0) and ``b`` (1); seq2seq
        input (0) and target (1)."""
        if self.options.format == "sft":
            return self.template.render(row, where)
        if self.options.format == "cls":
            return [(row["text_a"], 0)] + ([(row["text_b"], 1)] if "text_b" in row else [])
        return [(row["input"], 0), (row["target"], 1)]

    def _sample(self, tok: Tokenizer, row: dict[str, Any], pieces: list[tuple[str, int]],
                arrays: list[np.ndarray], dtype: type) -> tuple[np.ndarray, tuple]:
        """(tokens, extra members); empty tokens for a row that is dropped."""
        empty = np.zeros(0, dtype=dtype)
        if self.options.format == "sft":
            tokens = np.concatenate(arrays) if arrays else empty
            mask = np.concatenate([np.full(len(a), turn, dtype=np.uint8)
                                   for a, (_, turn) in zip(arrays, pieces)] or [empty])
            if not mask.any():
                return empty, ()
            return tokens, (("mask.npy", npy_bytes(mask.astype(np.uint8))),)
        if self.options.format == "cls":
            if any(len(a) == 0 for a in arrays):
                return empty, ()
            cls, sep = np.array([tok.cls_id], dtype), np.array([tok.sep_id], dtype)
            parts = [cls, arrays[0], sep] + ([arrays[1], sep] if len(arrays) > 1 else [])
            label = str(self.label_ids[row["label"]])
            return np.concatenate(parts), (("cls", label.encode("ascii")),)
        source, target = arrays
        if len(target) == 0:
            return empty, ()
        return source, (("target.npy", npy_bytes(target)),)
