"""Tokenizers: one interface (``Tokenizer``), SentencePiece and Hugging Face tokenizers as its two
kinds, one loader that tells them apart by content, and the conversion to a Hugging Face
``tokenizer.json`` for export (``convert_to_hf``)."""

from megatrain.data.tokenizer.base import (
    WORD_ALONE,
    WORD_END,
    WORD_START,
    Tokenizer,
    piece_word_flags,
)
from megatrain.data.tokenizer.files import find_tokenizer_file, is_hf_tokenizer_file, load_tokenizer
from megatrain.data.tokenizer.hf_tokenizer import HFTokenizer
from megatrain.data.tokenizer.sentencepiece_tokenizer import (
    CONTROL_TOKENS,
    SentencePieceTokenizer,
)

__all__ = [
    "CONTROL_TOKENS",
    "WORD_ALONE",
    "WORD_END",
    "WORD_START",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "find_tokenizer_file",
    "is_hf_tokenizer_file",
    "load_tokenizer",
    "piece_word_flags",
]
