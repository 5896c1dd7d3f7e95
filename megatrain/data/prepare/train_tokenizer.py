"""Training megatrain's SentencePiece tokenizer on a corpus (``megatrain-prepare``).

The options make the model round-trip any text exactly and reserve BERT's and T5's control
tokens (see ``megatrain.data.tokenizer.sentencepiece_tokenizer``).
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from megatrain.data.tokenizer.sentencepiece_tokenizer import (
    BOS_ID,
    CONTROL_TOKENS,
    EOS_ID,
    PAD_ID,
    UNK_ID,
)
from megatrain.errors import ConfigError, DataError

# Bumped whenever trained tokenizers change shape, so corpora cached by an older version are
# prepared again rather than reused.
TOKENIZER_FORMAT = 2
MIN_VOCAB = 256 + 5 + len(CONTROL_TOKENS)  # bytes, unk/bos/eos/pad/newline, control tokens
DEFAULT_MAX_SENTENCES = 300_000
MAX_LINE_BYTES = 8192
TOKENIZER_TYPES = ("bpe", "unigram", "char")


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
