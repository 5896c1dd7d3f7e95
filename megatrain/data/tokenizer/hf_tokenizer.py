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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megatrain.data.tokenizer.base import WORD_ALONE, WORD_START, Tokenizer, piece_word_flags
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
        spec = json.loads(self._hf.to_str())
        model = spec.get("model") or {}
        pipeline = [spec.get("pre_tokenizer"), spec.get("decoder")]
        if model.get("type") == "WordPiece":
            prefix = model.get("continuing_subword_prefix") or "##"
            flags = lambda piece: 0 if piece.startswith(prefix) else WORD_START
        elif _find_type(pipeline, "ByteLevel") is not None:
            from tokenizers.decoders import ByteLevel  # the text a piece's bytes stand for

            byte_level = ByteLevel()
            flags = lambda piece: piece_word_flags(byte_level.decode([piece]))
        else:
            space = _space_marker(spec, pipeline)
            fallback = bool(model.get("byte_fallback"))
            if space is None:
                raise ConfigError(f"data.whole_word_masking: {self.path}'s pieces do not mark word "
                                  "boundaries (no WordPiece '##', byte-level 'Ġ' or SentencePiece "
                                  "'▁'); use token-level masking with this tokenizer")
            flags = lambda piece: piece_word_flags(piece, space, fallback)
        table = np.full(self.vocab_size, WORD_ALONE, dtype=np.uint8)
        for piece, i in self._hf.get_vocab(with_added_tokens=False).items():
            table[i] = flags(piece)
        for added in spec.get("added_tokens") or []:  # matched in text as written
            table[added["id"]] = (WORD_ALONE if added.get("special")
                                  else piece_word_flags(added["content"]))
        return table


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
