"""SentencePiece tokenizer (BPE, unigram or char) that round-trips source code exactly.

The default corpus is Python source, where indentation, tabs and newlines carry meaning, so the
model is trained with identity normalization, no whitespace collapsing, no dummy prefix and byte
fallback: ``decode(encode(text)) == text`` for any text. SentencePiece trains line by line and
never sees a newline, so ``"\\n"`` is a user-defined symbol (one token, never merged).

Every trained model also reserves the control tokens BERT and T5 need: ``[CLS]``, ``[SEP]``,
``[MASK]`` and the T5 sentinels ``<extra_id_0>`` … ``<extra_id_99>``. Control tokens are never
produced by ``encode`` (text that spells them stays text) and decode to nothing; the objectives
insert them.

``Tokenizer.load`` also reads a Hugging Face ``tokenizer.json`` (dispatching on the file's
content, so a copy under another name still loads) into :class:`~megatrain.data.hf_tokenizer.
HFTokenizer`, an adapter with the same interface.
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from megatrain.errors import ConfigError, DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
NUM_SENTINELS = 100
CONTROL_TOKENS = ("[CLS]", "[SEP]", "[MASK]", *(f"<extra_id_{i}>" for i in range(NUM_SENTINELS)))
# Bumped whenever trained tokenizers change shape, so corpora cached by an older version are
# prepared again rather than reused.
TOKENIZER_FORMAT = 2
MIN_VOCAB = 256 + 5 + len(CONTROL_TOKENS)  # bytes, unk/bos/eos/pad/newline, control tokens
DEFAULT_MAX_SENTENCES = 300_000
MAX_LINE_BYTES = 8192
TOKENIZER_TYPES = ("bpe", "unigram", "char")
# Word flags of a piece (``Tokenizer.word_table``), for whole-word masking.
WORD_START = 1  # the piece begins a word wherever it stands (a leading space, a whitespace piece)
WORD_END = 2  # the piece ends its word: the next piece begins one (whitespace, a special token)
WORD_ALONE = WORD_START | WORD_END  # whitespace-only pieces and special tokens
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """A loaded SentencePiece model with the ids megatrain relies on."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path) -> None:
        self._sp = processor
        self.path = path
        self.vocab_size: int = processor.vocab_size()
        self.unk_id: int = processor.unk_id()
        self.eos_id: int = processor.eos_id()
        self.bos_id: int = processor.bos_id()
        self.pad_id: int = processor.pad_id()
        self.cls_id: int = self._control_id("[CLS]")
        self.sep_id: int = self._control_id("[SEP]")
        self.mask_id: int = self._control_id("[MASK]")
        # <extra_id_0>, <extra_id_1>, ... as many as the model has, in order.
        self.sentinel_ids: list[int] = []
        while (sid := self._control_id(f"<extra_id_{len(self.sentinel_ids)}>")) >= 0:
            self.sentinel_ids.append(sid)

    def _control_id(self, piece: str) -> int:
        """The id of a control ``piece``, or -1 when the model does not have it."""
        pid = self._sp.piece_to_id(piece)
        return pid if pid != self.unk_id or piece == self._sp.id_to_piece(pid) else -1

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a SentencePiece model or a Hugging Face ``tokenizer.json`` (or a folder holding
        ``tokenizer.model`` or ``tokenizer.json``); DataError if it is missing or neither."""
        path = find_tokenizer_file(Path(path))
        if is_hf_tokenizer_file(path):
            from megatrain.data.hf_tokenizer import HFTokenizer

            return HFTokenizer.from_file(path)
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{path} is not a SentencePiece model: {exc}") from exc
        return cls(processor, path)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], threads: int = -1) -> list[list[int]]:
        """Token ids of each text (SentencePiece batches the calls in C++ on ``threads`` threads;
        -1: all cores)."""
        return self._sp.encode(texts, num_threads=threads)

    def encode_arrays(self, texts: list[str], threads: int = 1) -> list[np.ndarray]:
        """Token ids of each text as integer arrays: no Python int per token (prepare's path)."""
        try:
            return self._sp.encode(texts, num_threads=threads, out_type="numpy")
        except (ValueError, RuntimeError):  # an older sentencepiece has no numpy output
            return [np.asarray(ids) for ids in self._sp.encode(texts, num_threads=threads)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; the inverse of :meth:`encode`."""
        return self._sp.decode([int(i) for i in ids])

    def word_table(self) -> np.ndarray:
        """(vocab_size,) uint8 ``WORD_START`` / ``WORD_END`` flags of every id (see
        :func:`piece_word_flags`): pieces with a leading ``▁`` start words, whitespace pieces
        (``▁▁``, ``"\\n"``, the byte ``<0x09>``) stand alone, control/unknown ids too; the other
        byte pieces (UTF-8 lead and continuation bytes) continue, so a character is never split."""
        sp = self._sp
        return np.array([WORD_ALONE if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
                         else piece_word_flags(sp.id_to_piece(i), byte_fallback=sp.is_byte(i))
                         for i in range(self.vocab_size)], dtype=np.uint8)


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


def find_tokenizer_file(path: Path) -> Path:
    """``path`` itself, or for a folder its ``tokenizer.model`` (preferred) or ``tokenizer.json``."""
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return path / name
        raise DataError(f"tokenizer folder {path} holds neither tokenizer.model nor tokenizer.json")
    if not path.is_file():
        raise DataError(f"tokenizer model {path} does not exist")
    return path


def is_hf_tokenizer_file(path: Path) -> bool:
    """True for a JSON file (a ``tokenizer.json``); a SentencePiece model is binary protobuf,
    whose first byte is never ``{``."""
    with path.open("rb") as f:
        return f.read(64).lstrip()[:1] == b"{"


def _sample_lines(texts: Iterable[str], max_sentences: int, seed: int) -> list[str]:
    """A uniform reservoir sample of at most ``max_sentences`` non-blank lines of ``texts``.

    Memory is bounded by the sample, not the corpus; the seed makes the sample reproducible.
    """
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for text in texts:
        for line in text.splitlines():
            if not line.strip() or len(line) > MAX_LINE_BYTES // 4:
                continue
            seen += 1
            if len(sample) < max_sentences:
                sample.append(line)
            else:
                slot = rng.randrange(seen)
                if slot < max_sentences:
                    sample[slot] = line
    return sample


def train_tokenizer(
    texts: Iterable[str],
    model_path: Path,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    threads: int = 1,
    max_sentences: int = DEFAULT_MAX_SENTENCES,
    seed: int = 0,
) -> Path:
    """Train a byte-fallback model (``bpe``, ``unigram`` or ``char``) on a reservoir sample of
    at most ``max_sentences`` lines of ``texts``; write ``model_path``."""
    if model_type not in TOKENIZER_TYPES:
        raise ConfigError(
            f"tokenizer type must be one of {', '.join(TOKENIZER_TYPES)}, got {model_type!r}"
        )
    if max_sentences < 1:
        raise ConfigError(f"the tokenizer sample must hold at least 1 line, got {max_sentences}")
    if vocab_size < MIN_VOCAB:
        raise ConfigError(
            f"vocab_size must be at least {MIN_VOCAB} (256 bytes + {MIN_VOCAB - 256} special "
            f"tokens), got {vocab_size}"
        )
    lines = _sample_lines(texts, max_sentences, seed)
    if not lines:
        raise DataError("cannot train a tokenizer: the corpus has no text")
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(lines),
            model_writer=proto,
            **_trainer_options(vocab_size, threads, model_type),
        )
    except RuntimeError as exc:  # e.g. a vocabulary smaller than the corpus' distinct characters
        raise ConfigError(f"cannot train a {vocab_size}-piece tokenizer: {exc}") from exc
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(proto.getvalue())
    return model_path


def _trainer_options(vocab_size: int, threads: int, model_type: str = "bpe") -> dict[str, object]:
    """SentencePiece options for lossless code tokenization (see the module docstring)."""
    return {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hard_vocab_limit": False,
        "byte_fallback": True,
        "character_coverage": 0.9999,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "allow_whitespace_only_pieces": True,
        "add_dummy_prefix": False,
        "user_defined_symbols": ["\n"],
        "control_symbols": list(CONTROL_TOKENS),
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "pad_id": PAD_ID,
        "max_sentence_length": MAX_LINE_BYTES,
        "input_sentence_size": 0,
        "num_threads": max(1, threads),
        "minloglevel": 2,
    }
