"""SentencePiece BPE tokenizer that round-trips source code exactly.

The default corpus is Python source, where indentation, tabs and newlines carry meaning, so the
model is trained with identity normalization, no whitespace collapsing, no dummy prefix and byte
fallback: ``decode(encode(text)) == text`` for any text. SentencePiece trains line by line and
never sees a newline, so ``"\\n"`` is a user-defined symbol (one token, never merged).

Every trained model also reserves the control tokens BERT and T5 need: ``[CLS]``, ``[SEP]``,
``[MASK]`` and the T5 sentinels ``<extra_id_0>`` … ``<extra_id_99>``. Control tokens are never
produced by ``encode`` (text that spells them stays text) and decode to nothing; the objectives
insert them.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

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
        """Load ``path`` (a ``tokenizer.model``); DataError if it is missing or not a model."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer model {path} does not exist")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{path} is not a SentencePiece model: {exc}") from exc
        return cls(processor, path)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (SentencePiece batches the calls in C++)."""
        return self._sp.encode(texts)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; the inverse of :meth:`encode`."""
        return self._sp.decode([int(i) for i in ids])


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
    threads: int = 1,
    max_sentences: int = DEFAULT_MAX_SENTENCES,
    seed: int = 0,
) -> Path:
    """Train a byte-fallback BPE model on a bounded sample of ``texts``; write ``model_path``."""
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
            **_trainer_options(vocab_size, threads),
        )
    except RuntimeError as exc:  # e.g. a vocabulary smaller than the corpus' distinct characters
        raise ConfigError(f"cannot train a {vocab_size}-piece tokenizer: {exc}") from exc
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(proto.getvalue())
    return model_path


def _trainer_options(vocab_size: int, threads: int) -> dict[str, object]:
    """SentencePiece options for lossless code tokenization (see the module docstring)."""
    return {
        "model_type": "bpe",
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
