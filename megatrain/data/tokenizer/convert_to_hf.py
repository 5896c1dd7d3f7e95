"""megatrain's tokenizer -> a Hugging Face fast tokenizer (``tokenizer.json``).

A SentencePiece model (``bpe``, ``unigram`` or ``char``) is converted keeping SentencePiece's
behaviour for megatrain's tokenizers (byte fallback, no dummy prefix, identity normalization,
``"\\n"`` a single user-defined piece), so
``AutoTokenizer.from_pretrained(dir).encode(text, add_special_tokens=False)`` gives the ids
megatrain trained on:

- ``bpe``: ``tokenizers``' BPE with merges ranked by the pieces' scores and ``ignore_merges``
  off: a word is only ever built by merges, as SentencePiece builds it.
- ``unigram``: ``tokenizers``' Unigram with the pieces' scores: the same Viterbi search. Pieces
  SentencePiece never matches in text (unk, control, the byte pieces ``<0x41>``) get a score no
  segmentation prefers, and characters found in no normal piece are split off by the
  pre-tokenizer, so text that spells a byte piece encodes as in SentencePiece.
- ``char``: the same Unigram, whose normal pieces are all single characters.

The pipeline is built from the model's pieces and settings with ``tokenizers`` alone (not with
transformers' converter, whose choices change between releases); ``transformers`` only wraps and
saves it.

A Hugging Face ``tokenizer.json`` (a corpus prepared with ``--tokenizer tokenizer.json``) is
saved with its pipeline unchanged and the special-token roles megatrain reads from it, as the
generic fast tokenizer (transformers' model classes, e.g. ``T5Tokenizer``, rebuild their own).

What can differ: text spelling a special token (``"</s>"``, ``"[MASK]"``, ``"<extra_id_0>"``) is
that token in Hugging Face, plain characters in SentencePiece. And SentencePiece's unigram search
sums scores in float32, ``tokenizers``' in float64: segmentations whose scores tie (runs of spaces
in code: ``▁▁▁▁ ▁▁`` or ``▁▁ ▁▁▁▁``) or differ by less than float32 rounding can come out
differently.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatrain.data.tokenizer.base import Tokenizer
from megatrain.data.tokenizer.files import load_tokenizer
from megatrain.data.tokenizer.hf_tokenizer import CONFIG_FILE, HFTokenizer
from megatrain.errors import ConfigError
from megatrain.models.common.hf import import_transformers

# SentencePiece model types and piece types (sentencepiece_model.proto).
_UNIGRAM, _BPE, _WORD, _CHAR = 1, 2, 3, 4
_MODEL_TYPES = {_UNIGRAM: "unigram", _BPE: "bpe", _WORD: "word", _CHAR: "char"}
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
_SPACE = "\u2581"  # SentencePiece's escaped space, "▁"

_ROLES = {"[CLS]": "cls_token", "[SEP]": "sep_token", "[MASK]": "mask_token"}
# tokenizer_config.json settings of a given Hugging Face tokenizer that carry over unchanged.
_KEPT_CONFIG = ("model_max_length", "chat_template")


@dataclass(frozen=True)
class ConvertedTokenizer:
    """A converted tokenizer, ready to write: the fast tokenizer and, for a SentencePiece model,
    the original file that goes beside it."""

    fast: Any  # transformers.PreTrainedTokenizerFast
    sentencepiece_model: Path | None

    def save(self, out_dir: Path) -> None:
        """tokenizer.json and tokenizer_config.json (+ tokenizer.model for SentencePiece)."""
        out_dir = Path(out_dir)
        if self.sentencepiece_model is not None:
            target = out_dir / "tokenizer.model"
            if not (target.exists() and target.samefile(self.sentencepiece_model)):
                shutil.copyfile(self.sentencepiece_model, target)
        self.fast.save_pretrained(out_dir)


def to_hf_tokenizer(tokenizer: Tokenizer) -> ConvertedTokenizer:
    """Convert megatrain's tokenizer (a SentencePiece model or a Hugging Face tokenizer.json) to
    a Hugging Face fast tokenizer; a ConfigError says why one cannot be."""
    transformers = import_transformers()
    if isinstance(tokenizer, HFTokenizer):
        tok, specials, model = *_given_hf_tokenizer(tokenizer), None
    else:
        tok, specials, model = *_fast_tokenizer(tokenizer.path), tokenizer.path
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    return ConvertedTokenizer(fast, model)


def save_hf_tokenizer(path: Path, out_dir: Path) -> None:
    """Write ``out_dir``'s Hugging Face tokenizer for megatrain's tokenizer file ``path``."""
    to_hf_tokenizer(load_tokenizer(path)).save(out_dir)


# --- SentencePiece models -----------------------------------------------------------------------


def _special_tokens(proto: Any) -> dict[str, Any]:
    """bos/eos/unk/pad (and cls/sep/mask, T5's sentinels) token strings of the model, those it
    has, as ``PreTrainedTokenizerFast`` keyword arguments."""
    spec = proto.trainer_spec
    ids = {"bos_token": spec.bos_id, "eos_token": spec.eos_id, "unk_token": spec.unk_id,
           "pad_token": spec.pad_id}
    specials: dict[str, Any] = {name: proto.pieces[i].piece for name, i in ids.items() if i >= 0}
    controls = [p.piece for p in proto.pieces if p.type == _CONTROL]
    specials.update({_ROLES[p]: p for p in controls if p in _ROLES})
    sentinels = [p for p in controls if p.startswith("<extra_id_")]
    if sentinels:
        specials["additional_special_tokens"] = sentinels
    return specials


def _check_normalizer(spm_path: Path, proto: Any) -> None:
    """ConfigError for whitespace handling the conversion does not reproduce (a SentencePiece
    model trained elsewhere, e.g. with a dummy prefix): its ids would differ."""
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    settings = {"add_dummy_prefix": norm.add_dummy_prefix,
                "remove_extra_whitespaces": norm.remove_extra_whitespaces,
                "escape_whitespaces": not norm.escape_whitespaces,
                "treat_whitespace_as_suffix": trainer.treat_whitespace_as_suffix}
    differs = [name for name, unsupported in settings.items() if unsupported]
    if differs:
        raise ConfigError(
            f"{spm_path}: cannot convert to Hugging Face's format with the same ids: the model "
            f"was trained with other whitespace handling ({', '.join(differs)}) than megatrain's "
            "(no dummy prefix, whitespace kept and escaped as a prefix)"
        )


def _fast_tokenizer(spm_path: Path) -> tuple[Any, dict[str, Any]]:
    """The ``tokenizers.Tokenizer`` and its special tokens, built from the SentencePiece model's
    own pieces, scores and settings with ``tokenizers`` alone.

    Not with transformers' converter (``SpmConverter.build_tokenizer_from_spm_proto``): its
    choices move between releases (5.24 turned on BPE's ``ignore_merges``, so text spelling a
    byte piece became that piece), and our ids must not depend on the user's transformers.
    """
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE, Unigram

    proto = _read_proto(spm_path)
    model_type = proto.trainer_spec.model_type
    if model_type not in (_BPE, _UNIGRAM, _CHAR):
        raise ConfigError(f"{spm_path}: a SentencePiece {_MODEL_TYPES.get(model_type, '?')} "
                          "model does not convert to Hugging Face's format (bpe, unigram and char "
                          "models do)")
    _check_normalizer(spm_path, proto)
    spec = proto.trainer_spec
    if model_type == _BPE:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        # ignore_merges=False: a word is built by merges only, never looked up whole (a byte
        # piece such as "<0x41>" is in the vocabulary but no merge makes it, as in SentencePiece).
        tok = Tokenizer(BPE(vocab=vocab, merges=_bpe_merges(proto), unk_token=spec.unk_piece,
                            fuse_unk=True, byte_fallback=spec.byte_fallback, dropout=None,
                            ignore_merges=False))
    else:
        tok = Tokenizer(Unigram(_unigram_vocab(proto), unk_id=spec.unk_id,
                                byte_fallback=spec.byte_fallback))
        tok.pre_tokenizer = _isolate_unmatched_characters(proto)
    tok.normalizer, tok.decoder = _whitespace_pipeline(proto)
    # SentencePiece emits user-defined pieces ("\n") whole wherever they occur, and control
    # pieces never come from text: both are added tokens, matched before the model.
    tok.add_tokens([AddedToken(p.piece, normalized=False, special=p.type == _CONTROL)
                    for p in proto.pieces if p.type in (_CONTROL, _USER_DEFINED)])
    specials = _special_tokens(proto)
    named = [t for k, t in specials.items() if k != "additional_special_tokens"]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in named])
    return tok, specials


def _read_proto(spm_path: Path) -> Any:
    """The model's ``ModelProto`` (pieces, scores, trainer and normalizer settings)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(spm_path).read_bytes())
    return proto


def _bpe_merges(proto: Any) -> list[tuple[str, str]]:
    """BPE merges that replay SentencePiece's BPE encoder: it merges, among adjacent symbols
    whose concatenation is a normal piece, the pair giving the highest-scored piece first (ties:
    the lower id). Every split of a normal piece into two normal pieces is a merge of that rank."""
    normal = {p.piece: (-p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = sorted((rank, piece[:cut], piece[cut:]) for piece, rank in normal.items()
                    for cut in range(1, len(piece))
                    if piece[:cut] in normal and piece[cut:] in normal)
    return [(left, right) for _, left, right in ranked]


def _whitespace_pipeline(proto: Any) -> tuple[Any, Any]:
    """Normalizer and decoder for megatrain's whitespace handling (``_check_normalizer``):
    the model's character map if it has one, spaces escaped as ``▁``, no dummy prefix; decoding
    turns ``▁`` back into spaces and byte pieces back into characters."""
    from tokenizers import decoders, normalizers

    steps = [normalizers.Replace(" ", _SPACE)]
    charsmap = proto.normalizer_spec.precompiled_charsmap
    if charsmap:
        steps.insert(0, normalizers.Precompiled(charsmap))
    decode = [decoders.Replace(_SPACE, " ")]
    if proto.trainer_spec.byte_fallback:
        decode += [decoders.ByteFallback(), decoders.Fuse()]
    return normalizers.Sequence(steps), decoders.Sequence(decode)


def _unigram_vocab(proto: Any) -> list[tuple[str, float]]:
    """(piece, score) for every id, for ``tokenizers``' Unigram.

    SentencePiece's Viterbi search only sees normal and user-defined pieces; a Unigram matches
    the others (unk, control, byte pieces) in text too: ``<0x41>`` spelled out. They get a score
    below that of any spelling of them in normal pieces (at least one piece per character), so
    no segmentation uses them where a normal one exists.

    That score also lowers the Unigram's unknown-character score (the lowest score minus 10;
    SentencePiece takes the lowest normal one), which changes nothing: SentencePiece's unigram and
    char vocabularies hold every character of their pieces as a piece of its own, so an unknown
    character is never inside a normal piece, and every segmentation has it as unk.
    """
    matched = (_NORMAL, _USER_DEFINED)
    lowest = min((p.score for p in proto.pieces if p.type == _NORMAL), default=0.0)
    longest = max(len(p.piece) for p in proto.pieces)
    unreachable = (longest + 1) * min(lowest, 0.0) - 1000.0
    return [(p.piece, p.score if p.type in matched else unreachable) for p in proto.pieces]


def _isolate_unmatched_characters(proto: Any) -> Any:
    """A pre-tokenizer that splits off each character of the unmatched pieces (unk, control,
    byte) that no normal piece contains, or None when there is none.

    SentencePiece never spans such a character (it is unknown: byte fallback), so cutting the
    text around it changes no segmentation. Without the cut, ``<0x41>`` spelled out in text whose
    ``<`` is unknown would be the byte piece: its score, however low, beats the path through the
    unknown ``<``, which scores 10 below the lowest score.
    """
    from tokenizers import pre_tokenizers

    known = {c for p in proto.pieces if p.type in (_NORMAL, _USER_DEFINED) for c in p.piece}
    unmatched = {c for p in proto.pieces if p.type not in (_NORMAL, _USER_DEFINED)
                 for c in p.piece}
    chars = sorted(unmatched - known)
    if not chars:
        return None
    return pre_tokenizers.Sequence([pre_tokenizers.Split(c, behavior="isolated") for c in chars])


# --- Hugging Face tokenizer.json ------------------------------------------------------------------


def _given_hf_tokenizer(hf: HFTokenizer) -> tuple[Any, dict[str, Any]]:
    """The ``tokenizers.Tokenizer`` of ``hf`` and the special tokens megatrain assigns it (from a
    ``tokenizer_config.json`` beside it, else the usual spellings)."""
    backend = hf._hf
    specials: dict[str, Any] = {f"{role}_token": token for role, token in hf.roles.items()}
    sentinels = [backend.id_to_token(i) for i in hf.sentinel_ids]
    if sentinels:
        specials["additional_special_tokens"] = sentinels
    config_file = hf.path.parent / CONFIG_FILE
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))  # valid: roles read it
        specials.update({k: config[k] for k in _KEPT_CONFIG if config.get(k) is not None})
    return backend, specials
