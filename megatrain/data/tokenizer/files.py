"""Finding and loading a tokenizer file: one loader for both kinds, chosen by content."""

from __future__ import annotations

from pathlib import Path

from megatrain.data.tokenizer.base import Tokenizer
from megatrain.data.tokenizer.hf_tokenizer import HFTokenizer
from megatrain.data.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer
from megatrain.errors import DataError

KINDS: tuple[type[Tokenizer], ...] = (SentencePieceTokenizer, HFTokenizer)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a SentencePiece model or a Hugging Face ``tokenizer.json``, or the one in a folder (a
    prepared corpus, a checkpoint); DataError if it is missing or neither.

    The kind is read from the content, not the name: checkpoints written before tokenizers were
    saved under their own names hold a tokenizer.json as ``tokenizer.model``.
    """
    path = find_tokenizer_file(Path(path))
    kind = HFTokenizer if is_hf_tokenizer_file(path) else SentencePieceTokenizer
    return kind.from_file(path)


def find_tokenizer_file(path: Path) -> Path:
    """``path`` itself, or for a folder its ``tokenizer.model`` (preferred) or ``tokenizer.json``."""
    if path.is_dir():
        for name in (kind.file_name for kind in KINDS):
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
