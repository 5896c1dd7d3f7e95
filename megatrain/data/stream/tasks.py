"""Task data (``megatrain-prepare --format sft|cls|seq2seq``) → batches: the fine-tuning
objectives and the packer that never splits a sample.

A task sample is one shard sample: its ``tokens.npy`` and extra members (``Doc.extra``): sft
``mask`` (0 = not a target, k >= 1 = a token of the k-th assistant turn), cls ``cls`` (the label
id), seq2seq ``target`` (ids). An objective turns a sample into a :class:`Sample` (or None:
dropped) and a micro-batch of samples into tensors:

- ``sft`` (decoder models): the sample's unit is its tokens + EOS (the EOS takes the mask of the
  last token); ``input_ids`` = unit[:-1], ``labels`` = unit[1:] where that token is a target,
  -100 elsewhere. ``data.sft.loss_on``: ``completion`` = tokens with mask > 0, ``last_turn`` =
  tokens whose mask is the sample's largest (its last assistant turn), ``all`` = every token (the
  prompt is trained too). With ``data.sft.packing`` several samples share a row, and ``doc_ids``
  make each its own document (positions restart, no attention or label across samples; the
  padding at the end of a row is a document of its own): each sample gets the loss it would get
  alone. Without it, one sample per row.
- ``cls`` (BERT): ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]``; ``token_type_ids`` are 1 from
  after the first [SEP] on; ``labels`` (B,) the class ids. No EOS.
- ``seq2seq`` (T5): ``input_ids`` = input + EOS, ``labels`` = target + EOS (-100 on padding),
  ``decoder_input_ids`` = the start token (pad) then the labels shifted right.

Truncation (samples longer than the rows):

- sft keeps a sample's first ``seq_len + 1`` tokens, its EOS counted: the end of the sample (the
  end of the completion, and its EOS) is what gets cut.
- cls cuts ``[CLS] a [SEP] b [SEP]`` to ``seq_len`` tokens by removing tokens from the end of the
  longer of a and b, one at a time (b on a tie): Hugging Face's ``longest_first``. A single text
  loses its end. [CLS] and [SEP] always stay.
- seq2seq cuts the input to ``seq_len`` tokens and the target to ``data.target_len`` (default
  ``seq_len``), each keeping its final EOS (the tokens before it are cut).

A sample left with no target token (sft: no label after truncation under ``loss_on``; under
``last_turn`` a sample whose last turn was cut away entirely) is dropped and counted
(``data_dropped`` in the stream's metrics); it is still listed in the trace (read, not trained).

Packing (:class:`SamplePacker`). Rows hold whole samples: a sample that does not fit in what is
left of a row starts the next row; the rest of the row is padding (the tokenizer's pad id, label
-100). Packed sft rows are ``seq_len`` wide; every other row (sft without packing, cls, seq2seq)
is padded to the micro-batch's longest row rounded up to a multiple of 8 (at most ``seq_len``;
seq2seq targets at most ``target_len``): far cheaper than ``seq_len`` on short samples. The
packer's state is the reader state at the first sample not yet in a batch, so resumes (exact and
elastic) reuse the stream's machinery unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from megatrain.data.stream.order import Doc, DocProducer
from megatrain.data.stream.targets import IGNORE
from megatrain.errors import ConfigError, DataError

LOSS_ON = ("completion", "last_turn", "all")
WIDTH_MULTIPLE = 8


@dataclass(slots=True)
class Sample:
    """A task sample ready for a row: the objective's arrays, the row positions it takes and,
    for cls, its label."""

    doc: Doc
    width: int
    arrays: tuple[np.ndarray, ...]
    label: int = -1


class TaskObjective:
    """What the stream asks of a task objective (see the module doc)."""

    name: str
    seq_len: int
    overlap: ClassVar[int] = 0
    packing: bool = False  # several samples per row (sft only)

    @property
    def row_tokens(self) -> int:
        return self.seq_len

    @property
    def needs(self) -> tuple[str, ...]:
        """The extra members (``Doc.extra`` keys) a sample must have; one without is skipped."""
        raise NotImplementedError

    def sample(self, doc: Doc) -> Sample | None:
        """The sample of a document, truncated; None when nothing is left to train on."""
        raise NotImplementedError

    def collate(self, rows: Sequence[Sequence[Sample]]) -> dict[str, torch.Tensor]:
        """The batch of ``rows`` (each one or, packed, several samples)."""
        raise NotImplementedError


def padded_width(rows: Sequence[Sequence[Sample]], cap: int, index: int = 0) -> int:
    """The longest row's width (array ``index`` of each sample) rounded up to a multiple of 8,
    at most ``cap``."""
    longest = max(sum(len(s.arrays[index]) for s in row) for row in rows)
    return min(-(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE, cap)


def _tensors(**arrays: np.ndarray) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


@dataclass(frozen=True)
class SupervisedLM(TaskObjective):
    """Instruction fine-tuning of decoder models: next-token loss on the target tokens only."""

    seq_len: int
    eos_id: int
    pad_id: int
    loss_on: str = "completion"
    packing: bool = True
    name: str = "sft"

    def __post_init__(self) -> None:
        if self.loss_on not in LOSS_ON:
            raise ConfigError(f"data.sft.loss_on={self.loss_on} is not one of "
                              f"{', '.join(LOSS_ON)}")

    @property
    def needs(self) -> tuple[str, ...]:
        return () if self.loss_on == "all" else ("mask",)

    def sample(self, doc: Doc) -> Sample | None:
        n = min(len(doc.tokens) + 1, self.seq_len + 1)  # the unit: tokens + EOS, truncated
        unit = np.empty(n, np.int64)
        body = min(len(doc.tokens), n)
        unit[:body] = doc.tokens[:body]
        unit[body:] = self.eos_id
        targets = self._targets(doc, n)[1:]
        if not targets.any():
            return None
        return Sample(doc, n - 1, (unit[:-1], np.where(targets, unit[1:], IGNORE)))

    def _targets(self, doc: Doc, n: int) -> np.ndarray:
        """Bool (n,): which tokens of the unit (EOS included) are trained on."""
        if self.loss_on == "all":
            return np.ones(n, bool)
        mask = doc.extra["mask"]
        unit_mask = np.append(mask, mask[-1] if len(mask) else 0)[:n]  # EOS: the last token's
        if self.loss_on == "completion":
            return unit_mask > 0
        last = int(mask.max()) if len(mask) else 0  # last_turn: the whole sample's last turn
        return (unit_mask == last) & (last > 0)

    def collate(self, rows: Sequence[Sequence[Sample]]) -> dict[str, torch.Tensor]:
        width = self.seq_len if self.packing else padded_width(rows, self.seq_len)
        shape = (len(rows), width)
        ids, labels = np.full(shape, self.pad_id, np.int64), np.full(shape, IGNORE, np.int64)
        docs = np.zeros(shape, np.int64)
        for r, row in enumerate(rows):
            at = 0
            for j, s in enumerate(row):
                ids[r, at : at + s.width], labels[r, at : at + s.width] = s.arrays
                docs[r, at : at + s.width] = j
                at += s.width
            docs[r, at:] = len(row)  # the padding: a document of its own
        if not self.packing:
            return _tensors(input_ids=ids, labels=labels)
        return _tensors(input_ids=ids, labels=labels, doc_ids=docs)


def longest_first(len_a: int, len_b: int, remove: int) -> tuple[int, int]:
    """How many tokens to cut from the ends of a and b: from the longer one until they are
    equal, then alternately (b gets the odd one). Hugging Face's ``longest_first`` (in closed
    form, as ``PythonBackend.truncate_sequences`` computes it)."""
    first = min(abs(len_b - len_a), remove)
    second = remove - first
    if len_a > len_b:
        return first + second // 2, second - second // 2
    return second // 2, first + second - second // 2


@dataclass(frozen=True)
class Classification(TaskObjective):
    """Sequence (pair) classification for BERT: a pooled [CLS] head over ``num_labels``."""

    seq_len: int
    cls_id: int
    sep_id: int
    pad_id: int
    num_labels: int | None = None  # the manifest's label count: a larger class id is an error
    name: str = "cls"

    def __post_init__(self) -> None:
        if self.seq_len < 3:
            raise ConfigError(f"data.objective=cls needs data.seq_len >= 3 ([CLS] a [SEP] b "
                              f"[SEP] at the least), got {self.seq_len}")

    @property
    def needs(self) -> tuple[str, ...]:
        return ("cls",)

    def sample(self, doc: Doc) -> Sample | None:
        tokens, label = doc.tokens, doc.extra["cls"]
        if self.num_labels is not None and label >= self.num_labels:
            raise DataError(f"sample {doc.key}: class {label} is not one of the corpus's "
                            f"{self.num_labels} labels (manifest.json task.labels)")
        seps = np.flatnonzero(tokens[1:] == self.sep_id)
        if len(tokens) < 2 or not len(seps) or tokens[-1] != self.sep_id:
            raise DataError(f"sample {doc.key} is not [CLS] a [SEP] or [CLS] a [SEP] b [SEP] "
                            "(was it prepared with --format cls and this tokenizer?)")
        s = int(seps[0]) + 1  # the first [SEP]
        a, b = tokens[1:s], tokens[s + 1 : -1] if s < len(tokens) - 1 else None
        remove = len(tokens) - self.seq_len
        if remove > 0:
            cut_a, cut_b = (remove, 0) if b is None else longest_first(len(a), len(b), remove)
            a, b = a[: len(a) - cut_a], None if b is None else b[: len(b) - cut_b]
        sep = np.array([self.sep_id], np.int64)
        ids = np.concatenate([tokens[:1], a, sep] + ([] if b is None else [b, sep]))
        types = np.zeros(len(ids), np.int64)
        types[len(a) + 2 :] = 1  # segment 1 starts after the first [SEP]
        return Sample(doc, len(ids), (ids.astype(np.int64), types), int(label))

    def collate(self, rows: Sequence[Sequence[Sample]]) -> dict[str, torch.Tensor]:
        shape = (len(rows), padded_width(rows, self.seq_len))
        ids, types = np.full(shape, self.pad_id, np.int64), np.zeros(shape, np.int64)
        attention = np.zeros(shape, np.int64)
        for r, (s,) in enumerate(rows):
            ids[r, : s.width], types[r, : s.width] = s.arrays
            attention[r, : s.width] = 1
        labels = np.array([s.label for (s,) in rows], np.int64)
        return _tensors(input_ids=ids, token_type_ids=types, attention_mask=attention,
                        labels=labels)


@dataclass(frozen=True)
class Seq2Seq(TaskObjective):
    """Input → target for T5: the encoder reads the input, the decoder predicts the target."""

    seq_len: int
    target_len: int
    eos_id: int
    start_id: int  # the decoder's start token (T5: pad), also the padding
    name: str = "seq2seq"

    @property
    def needs(self) -> tuple[str, ...]:
        return ("target",)

    def sample(self, doc: Doc) -> Sample | None:
        source = np.append(doc.tokens[: self.seq_len - 1], self.eos_id).astype(np.int64)
        target = np.append(doc.extra["target"][: self.target_len - 1], self.eos_id)
        return Sample(doc, len(source), (source, target.astype(np.int64)))

    def collate(self, rows: Sequence[Sequence[Sample]]) -> dict[str, torch.Tensor]:
        S, T = padded_width(rows, self.seq_len, 0), padded_width(rows, self.target_len, 1)
        ids, attention = np.full((len(rows), S), self.start_id, np.int64), np.zeros((len(rows), S),
                                                                                   np.int64)
        decoder, labels = (np.full((len(rows), T), self.start_id, np.int64),
                           np.full((len(rows), T), IGNORE, np.int64))
        for r, (s,) in enumerate(rows):
            source, target = s.arrays
            ids[r, : len(source)], attention[r, : len(source)] = source, 1
            labels[r, : len(target)] = target
            decoder[r, 1 : len(target)] = target[:-1]
        return _tensors(input_ids=ids, attention_mask=attention, decoder_input_ids=decoder,
                        labels=labels)


# --- packing --------------------------------------------------------------------------------


@dataclass(slots=True)
class TaskWindow:
    """A micro-batch of whole samples, and what it consumed: the documents (placed or dropped,
    in reading order), the tokens it placed from each source and how many samples it dropped."""

    rows: list[list[Sample]]
    consumed: list[Doc]
    source_tokens: list[int]
    dropped: int


class SamplePacker:
    """Rows of whole samples (module doc); ``state()`` after a window is where the next starts.

    It reads one sample ahead (to know that it does not fit), so the state is the reader's
    position at that sample; the samples it dropped on the way belong to the window before."""

    def __init__(self, producer: DocProducer, objective: TaskObjective, *, rows: int) -> None:
        self.producer, self.objective, self.rows = producer, objective, rows
        self._next: Sample | None = None  # read, not in a batch yet
        self._room = 0  # positions left in the last row
        self._sources = len(producer.cursors)

    def windows(self) -> Iterator[TaskWindow]:
        while True:
            window = TaskWindow([], [], [0] * self._sources, 0)
            while (sample := self._peek(window)) is not None and self._place(window.rows,
                                                                               sample):
                window.consumed.append(sample.doc)
                window.source_tokens[sample.doc.src] += sample.width
                self._next = None
            if not window.rows:  # the data has ended (a share of dropped samples only: lost)
                return
            yield window

    def state(self) -> dict[str, Any]:
        return self.producer.state_at(self._next.doc if self._next else None)

    def _peek(self, window: TaskWindow) -> Sample | None:
        """The next sample to place; the ones dropped before it go to ``window``."""
        while self._next is None:
            doc = self.producer.next_doc()
            if doc is None:
                return None
            self._next = self.objective.sample(doc)
            if self._next is None:
                window.consumed.append(doc)
                window.dropped += 1
        return self._next

    def _place(self, rows: list[list[Sample]], sample: Sample) -> bool:
        if self.objective.packing and rows and sample.width <= self._room:
            rows[-1].append(sample)
            self._room -= sample.width
            return True
        if len(rows) == self.rows:
            return False
        rows.append([sample])
        self._room = self.objective.seq_len - sample.width
        return True


# --- construction ---------------------------------------------------------------------------


TASK_OBJECTIVES = ("sft", "cls", "seq2seq")


def build_task_objective(name: str, seq_len: int, tokenizer: Any, *,
                         target_len: int | None = None, loss_on: str = "completion",
                         packing: bool = True, num_labels: int | None = None) -> TaskObjective:
    """The task objective ``name`` over ``tokenizer``'s ids; ConfigError naming the token it
    lacks (cls: [CLS], [SEP] and pad; seq2seq: pad). sft pads with the pad token, or with EOS
    where there is none (GPT-2's tokenizer): labels come from the samples' masks, never from
    token ids, so padding is never a target and EOS always is."""
    path = getattr(tokenizer, "path", "the tokenizer")
    if name == "sft":
        filler = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
        return SupervisedLM(seq_len, tokenizer.eos_id, filler, loss_on, packing)
    if name == "cls":
        missing = [t for t, i in (("[CLS]", tokenizer.cls_id), ("[SEP]", tokenizer.sep_id),
                                  ("pad", tokenizer.pad_id)) if i < 0]
        if missing:
            raise ConfigError(f"data.objective=cls needs {', '.join(missing)}; {path} has none")
        return Classification(seq_len, tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id,
                              num_labels)
    if name == "seq2seq":
        if tokenizer.pad_id < 0:
            raise ConfigError(f"data.objective=seq2seq needs a pad token (the decoder's start "
                              f"token); {path} has none")
        return Seq2Seq(seq_len, target_len or seq_len, tokenizer.eos_id, tokenizer.pad_id)
    raise ConfigError(f"{name} is not a task objective; valid: {', '.join(TASK_OBJECTIVES)}")
