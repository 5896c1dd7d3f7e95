"""megatrain's SentencePiece tokenizer -> a Hugging Face fast tokenizer (``tokenizer.json``).

The conversion keeps SentencePiece's behaviour for megatrain's tokenizers (BPE, byte fallback,
no dummy prefix, identity normalization, ``"\\n"`` a single user-defined piece), so
``AutoTokenizer.from_pretrained(dir).encode(text, add_special_tokens=False)`` gives the ids
megatrain trained on. One difference: text spelling a control token (``"</s>"``) is that token in
Hugging Face, plain characters in SentencePiece.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from megatrain.errors import ConfigError
from megatrain.models.hf import import_transformers

_BPE, _CONTROL, _USER_DEFINED = 2, 3, 4  # SentencePiece model / piece types


_ROLES = {"[CLS]": "cls_token", "[SEP]": "sep_token", "[MASK]": "mask_token"}


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


def _fast_tokenizer(spm_path: Path) -> tuple[Any, dict[str, str]]:
    """The ``tokenizers.Tokenizer`` and its special tokens, built with transformers'
    SentencePiece extraction (vocabulary and BPE merges)."""
    import_transformers()
    from tokenizers import AddedToken
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    extractor = SentencePieceExtractor(str(spm_path))
    proto = extractor.proto
    if proto.trainer_spec.model_type != _BPE:
        raise ConfigError(f"{spm_path}: only BPE SentencePiece tokenizers convert to Hugging "
                          "Face's format")
    bpe = extractor.extract(BPE)
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, bpe["vocab"], bpe["merges"])
    tok.add_tokens([AddedToken(p.piece, normalized=False, special=p.type == _CONTROL)
                    for p in proto.pieces if p.type in (_CONTROL, _USER_DEFINED)])
    specials = _special_tokens(proto)
    named = [t for k, t in specials.items() if k != "additional_special_tokens"]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in named])
    return tok, specials


def save_hf_tokenizer(spm_path: Path, out_dir: Path) -> None:
    """Write tokenizer.model (the original), tokenizer.json and tokenizer_config.json."""
    transformers = import_transformers()
    shutil.copyfile(spm_path, out_dir / "tokenizer.model")
    tok, specials = _fast_tokenizer(spm_path)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(out_dir)
