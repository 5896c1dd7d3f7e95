"""SentencePiece tokenizer (BPE, unigram or char) that round-trips source code exactly.

The default corpus is Python source, where indentation, tabs and newlines carry meaning, so the
model is trained (``megatrain.data.prepare.train_tokenizer``) with identity normalization, no
whitespace collapsing, no dummy prefix and byte fallback: ``decode(encode(text)) == text`` for any
text. SentencePiece trains line by line and never sees a newline, so ``"\\n"`` is a user-defined
symbol (one token, never merged).

Every trained model also reserves the control tokens BERT and T5 need: ``[CLS]``, ``[SEP]``,
``[MASK]`` and the T5 sentinels ``<extra_id_0>`` … ``<extra_id_99>``. Control tokens are never
produced by ``encode`` (text that spells them stays text) and decode to nothing; the objectives
insert them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from megatrain.data.tokenizer.base import (
    WORD_ALONE,
    Tokenizer,
    piece_word_flags,
    spaced_piece_bytes,
)
from megatrain.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
NUM_SENTINELS = 100
CONTROL_TOKENS = ("[CLS]", "[SEP]", "[MASK]", *(f"<extra_id_{i}>" for i in range(NUM_SENTINELS)))


class SentencePieceTokenizer(Tokenizer):
    """A loaded SentencePiece model with the ids megatrain relies on."""

    file_name = "tokenizer.model"

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path) -> None:
        self._sp = processor
        ids = {"unk": processor.unk_id(), "bos": processor.bos_id(), "eos": processor.eos_id(),
               "pad": processor.pad_id(), "cls": self._control_id("[CLS]"),
               "sep": self._control_id("[SEP]"), "mask": self._control_id("[MASK]")}
        sentinels: list[int] = []
        while (sid := self._control_id(f"<extra_id_{len(sentinels)}>")) >= 0:
            sentinels.append(sid)
        super().__init__(path, processor.vocab_size(), ids, sentinels)

    @classmethod
    def from_file(cls, path: Path) -> SentencePieceTokenizer:
        """Load ``path``; DataError if it is not a SentencePiece model."""
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{path} is not a SentencePiece model: {exc}") from exc
        return cls(processor, path)

    def _control_id(self, piece: str) -> int:
        """The id of a control ``piece``, or -1 when the model does not have it."""
        pid = self._sp.piece_to_id(piece)
        return pid if pid != self._sp.unk_id() or piece == self._sp.id_to_piece(pid) else -1

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], threads: int = -1) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=threads)

    def encode_arrays(self, texts: list[str], threads: int = 1) -> list[np.ndarray]:
        try:
            return self._sp.encode(texts, num_threads=threads, out_type="numpy")
        except (ValueError, RuntimeError):  # an older sentencepiece has no numpy output
            return [np.asarray(ids) for ids in self._sp.encode(texts, num_threads=threads)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def _special(self, i: int) -> bool:
        sp = self._sp
        return sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)

    def byte_lengths(self) -> np.ndarray:
        """With identity normalization and no dummy prefix the pieces spell the text exactly."""
        sp = self._sp
        return np.array([0 if self._special(i)
                         else spaced_piece_bytes(sp.id_to_piece(i), byte_fallback=sp.is_byte(i))
                         for i in range(self.vocab_size)], dtype=np.int64)

    def word_table(self) -> np.ndarray:
        """Pieces with a leading ``▁`` start words, whitespace pieces (``▁▁``, ``"\\n"``, the byte
        ``<0x09>``) stand alone, control/unknown ids too; the other byte pieces (UTF-8 lead and
        continuation bytes) continue, so a character is never split."""
        sp = self._sp
        return np.array([WORD_ALONE if self._special(i)
                         else piece_word_flags(sp.id_to_piece(i), byte_fallback=sp.is_byte(i))
                         for i in range(self.vocab_size)], dtype=np.uint8)
