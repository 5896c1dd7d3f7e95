"""A Hugging Face ``tokenizer.json`` behind megatrain's :class:`~megatrain.data.tokenizer.base.
Tokenizer` interface.

So a corpus can be prepared with the exact tokenizer of an existing model (GPT-2, Llama, T5 …).
``tokenizer.json`` does not say which token plays which role, so the roles come from a
``tokenizer_config.json`` beside it when there is one (Hugging Face folders have it), else from
the usual spellings (``</s>``, ``<|endoftext|>``, ``[SEP]`` …). ``encode`` never adds special
tokens and ``decode`` skips them, as SentencePiece's control tokens do.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatrain.data.tokenizer.base import (
    WORD_ALONE,
    WORD_START,
    Tokenizer,
    piece_word_flags,
    spaced_piece_bytes,
)
from megatrain.errors import ConfigError, DataError

CONFIG_FILE = "tokenizer_config.json"
ROLE_CANDIDATES: dict[str, tuple[str, ...]] = {
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
}


class HFTokenizer(Tokenizer):
    """The ``tokenizers`` library's fast tokenizer with megatrain's ids and methods."""

    file_name = "tokenizer.json"

    def __init__(self, backend: Any, path: Path, roles: dict[str, str]) -> None:
        self._hf = backend
        self.roles = roles  # role -> token string ("eos" -> "</s>"), as the export names them
        vocab = backend.get_vocab(with_added_tokens=True)
        sentinels: list[int] = []
        while (sid := vocab.get(f"<extra_id_{len(sentinels)}>", -1)) >= 0:
            sentinels.append(sid)
        super().__init__(path, max(vocab.values()) + 1,
                         {role: vocab.get(token, -1) for role, token in roles.items()}, sentinels)

    def companion_files(self) -> list[Path]:
        """``tokenizer_config.json`` beside it, when there is one: it names the roles."""
        config = self.path.parent / CONFIG_FILE
        return [config] if config.is_file() else []

    @classmethod
    def from_file(cls, path: Path) -> HFTokenizer:
        """Load ``path`` (a ``tokenizer.json``); DataError if it is not one."""
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError as exc:
            raise ConfigError(
                f"{path} is a Hugging Face tokenizer; reading it needs the 'tokenizers' package "
                "(pip install tokenizers)"
            ) from exc
        try:
            backend = Backend.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
            raise DataError(f"{path} is not a Hugging Face tokenizer.json: {exc}") from exc
        vocab = backend.get_vocab(with_added_tokens=True)
        return cls(backend, path, special_roles(vocab, path.parent / CONFIG_FILE))

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], threads: int = -1) -> list[list[int]]:
        """(``tokenizers`` batches in Rust with its own threads.)"""
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def encode_arrays(self, texts: list[str], threads: int = 1) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def word_table(self) -> np.ndarray:
        """For a WordPiece model a piece without the ``##`` prefix starts a word (BERT's rule); for a
        byte-level model (GPT-2's ``Ġ``) a piece is read as the bytes it stands for; otherwise
        the Metaspace ``▁`` marks spaces and byte-fallback pieces ``<0xNN>`` are bytes. Special
        added tokens, and ids the vocabulary skips, stand alone."""
        kind = self._piece_kind()
        if kind.prefix is not None:
            flags = lambda piece: 0 if piece.startswith(kind.prefix) else WORD_START
        elif kind.byte_level:
            from tokenizers.decoders import ByteLevel  # the text a piece's bytes stand for

            byte_level = ByteLevel()
            flags = lambda piece: piece_word_flags(byte_level.decode([piece]))
        elif kind.space is None:
            raise ConfigError(f"data.whole_word_masking: {self.path}'s pieces do not mark word "
                              "boundaries (no WordPiece '##', byte-level 'Ġ' or SentencePiece "
                              "'▁'); use token-level masking with this tokenizer")
        else:
            flags = lambda piece: piece_word_flags(piece, kind.space, kind.byte_fallback)
        return self._table(flags, WORD_ALONE, np.uint8,
                           lambda added: piece_word_flags(added["content"]))

    def byte_lengths(self) -> np.ndarray:
        """Byte-level pieces are one character per byte; WordPiece's leave out the spaces between
        words (so bits per byte is a little high there); Metaspace's ``▁`` is one space."""
        kind = self._piece_kind()
        if kind.prefix is not None:
            size = lambda piece: len(piece.removeprefix(kind.prefix).encode())
        elif kind.byte_level:
            size = len
        else:
            size = lambda piece: spaced_piece_bytes(piece, kind.space or " ", kind.byte_fallback)
        return self._table(size, 0, np.int64, lambda added: len(added["content"].encode()))

    def _table(self, of_piece: Callable[[str], int], special: int, dtype: type,
               of_added: Callable[[dict[str, Any]], int]) -> np.ndarray:
        """A per-id table: ``of_piece`` of every vocabulary piece, ``of_added`` of each added
        token matched in text as written, ``special`` for special ones and ids not in use."""
        table = np.full(self.vocab_size, special, dtype=dtype)
        for piece, i in self._hf.get_vocab(with_added_tokens=False).items():
            table[i] = of_piece(piece)
        for added in self._spec().get("added_tokens") or []:
            table[added["id"]] = special if added.get("special") else of_added(added)
        return table

    def _spec(self) -> dict[str, Any]:
        return json.loads(self._hf.to_str())

    def _piece_kind(self) -> PieceKind:
        """How this model's pieces spell text (see :class:`PieceKind`)."""
        spec = self._spec()
        model = spec.get("model") or {}
        pipeline = [spec.get("pre_tokenizer"), spec.get("decoder")]
        if model.get("type") == "WordPiece":
            return PieceKind(prefix=model.get("continuing_subword_prefix") or "##")
        if _find_type(pipeline, "ByteLevel") is not None:
            return PieceKind(byte_level=True)
        return PieceKind(space=_space_marker(spec, pipeline),
                         byte_fallback=bool(model.get("byte_fallback")))


@dataclass(frozen=True)
class PieceKind:
    """WordPiece (``prefix`` marks a word's continuation), byte-level (each character one byte),
    or pieces where ``space`` stands for a space (None: spaces leave no mark) and ``<0xNN>``
    pieces are bytes when ``byte_fallback``."""

    prefix: str | None = None
    byte_level: bool = False
    space: str | None = None
    byte_fallback: bool = False


def _space_marker(spec: dict[str, Any], pipeline: list[Any]) -> str | None:
    """The character that stands for a space in the pieces: Metaspace's replacement, or what a
    normalizer replaces spaces with (SentencePiece conversions); None when spaces leave no mark
    (e.g. a ``Whitespace`` pre-tokenizer drops them)."""
    metaspace = _find_type(pipeline, "Metaspace")
    if metaspace is not None:
        return metaspace.get("replacement", "▁")
    replace = _find_type(spec.get("normalizer"), "Replace")
    if replace is not None and (replace.get("pattern") or {}).get("String") == " ":
        return replace.get("content") or None
    return None


def _find_type(node: Any, name: str) -> dict[str, Any] | None:
    """The first component of type ``name`` in a tokenizer.json pipeline (Sequences nest)."""
    if isinstance(node, list):
        return next((f for n in node if (f := _find_type(n, name)) is not None), None)
    if isinstance(node, dict):
        if node.get("type") == name:
            return node
        return _find_type(list(node.values()), name)
    return None


def special_roles(vocab: dict[str, int], config_file: Path) -> dict[str, str]:
    """role → token string: from ``tokenizer_config.json`` where it names one, else the first
    usual spelling that is in the vocabulary."""
    configured = _configured_roles(config_file)
    roles = {}
    for role, candidates in ROLE_CANDIDATES.items():
        token = configured.get(role) or next((c for c in candidates if c in vocab), None)
        if token is not None and token in vocab:
            roles[role] = token
    return roles


def _configured_roles(config_file: Path) -> dict[str, str]:
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{config_file} is not valid JSON: {exc}") from exc
    roles = {}
    for role in ROLE_CANDIDATES:
        value = config.get(f"{role}_token")
        if isinstance(value, dict):  # AddedToken serialized as {"content": ...}
            value = value.get("content")
        if isinstance(value, str):
            roles[role] = value
    return roles
