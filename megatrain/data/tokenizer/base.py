"""The one tokenizer interface the pipeline, the objectives, the trainer and the export use.

Two implementations sit beside it: :class:`~megatrain.data.tokenizer.sentencepiece_tokenizer.
SentencePieceTokenizer` (the models ``megatrain-prepare`` trains) and :class:`~megatrain.data.
tokenizer.hf_tokenizer.HFTokenizer` (a Hugging Face ``tokenizer.json`` given to prepare).
``load_tokenizer`` picks one by the file's content.
"""

from __future__ import annotations

import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

# Word flags of a piece (``Tokenizer.word_table``), for whole-word masking.
WORD_START = 1  # the piece begins a word wherever it stands (a leading space, a whitespace piece)
WORD_END = 2  # the piece ends its word: the next piece begins one (whitespace, a special token)
WORD_ALONE = WORD_START | WORD_END  # whitespace-only pieces and special tokens
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
ROLES = ("unk", "bos", "eos", "pad", "cls", "sep", "mask")


class Tokenizer(ABC):
    """A loaded tokenizer: its file, vocabulary size, the ids of its special tokens (-1 for one it
    does not have) and T5's sentinels in order. ``encode`` never adds special tokens; ``decode``
    leaves them out."""

    file_name: ClassVar[str]  # what ``save`` names the file, in a prepared corpus or checkpoint

    def __init__(self, path: Path, vocab_size: int, ids: dict[str, int],
                 sentinel_ids: list[int]) -> None:
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.unk_id, self.bos_id, self.eos_id, self.pad_id, self.cls_id, self.sep_id, \
            self.mask_id = (ids.get(role, -1) for role in ROLES)
        self.sentinel_ids = sentinel_ids  # <extra_id_0>, <extra_id_1>, ... in order

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""

    @abstractmethod
    def encode_batch(self, texts: list[str], threads: int = -1) -> list[list[int]]:
        """Token ids of each text (batched in native code; ``threads`` -1: all cores)."""

    @abstractmethod
    def encode_arrays(self, texts: list[str], threads: int = 1) -> list[np.ndarray]:
        """Token ids of each text as integer arrays: no Python int per token (prepare's path)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens left out; the inverse of :meth:`encode`."""

    @abstractmethod
    def word_table(self) -> np.ndarray:
        """(vocab_size,) uint8 ``WORD_START`` / ``WORD_END`` flags of every id, for whole-word
        masking (see :func:`piece_word_flags`)."""

    @abstractmethod
    def byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64: the UTF-8 bytes of text each id stands for (special tokens 0), so
        summed nats over summed bytes is bits per byte, comparable across tokenizers."""

    def companion_files(self) -> list[Path]:
        """Files beside ``path`` that belong to the tokenizer and travel with it."""
        return []

    def save(self, out_dir: Path) -> Path:
        """Copy the tokenizer into ``out_dir`` as ``file_name`` (with its companion files): the
        one naming rule for prepared corpora and checkpoints. Returns the copy's path."""
        out_dir = Path(out_dir)
        target = out_dir / self.file_name
        for source, dest in [(self.path, target),
                             *((f, out_dir / f.name) for f in self.companion_files())]:
            if not (dest.exists() and dest.samefile(source)):
                shutil.copyfile(source, dest)
        return target


def is_byte_piece(piece: str) -> bool:
    """Whether ``piece`` is a byte-fallback piece ``<0xNN>`` (one byte of text)."""
    return _BYTE_PIECE.fullmatch(piece) is not None


def spaced_piece_bytes(piece: str, space: str = "▁", byte_fallback: bool = False) -> int:
    """The UTF-8 bytes of text a piece whose ``space`` characters stand for spaces spells."""
    if byte_fallback and is_byte_piece(piece):
        return 1
    return len(piece.replace(space, " ").encode())


def piece_word_flags(piece: str, space: str = "▁", byte_fallback: bool = False) -> int:
    """The word flags of a piece whose ``space`` characters stand for spaces: ``WORD_START`` if
    it begins with whitespace, ``WORD_END`` if it ends with whitespace (both: whitespace only);
    a byte-fallback piece ``<0xNN>`` stands alone for an ASCII whitespace byte and continues
    otherwise (a byte of a multi-byte character)."""
    byte = _BYTE_PIECE.fullmatch(piece) if byte_fallback else None
    if byte:
        return WORD_ALONE if bytes([int(byte.group(1), 16)]).isspace() else 0
    text = piece.replace(space, " ")
    if not text:
        return 0
    return (WORD_START if text[0].isspace() else 0) | (WORD_END if text[-1].isspace() else 0)
