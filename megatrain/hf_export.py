"""A checkpoint -> a Hugging Face model directory (what ``megatrain-export`` writes).

The directory holds config.json, model.safetensors and the tokenizer (tokenizer.json,
tokenizer_config.json, and tokenizer.model for a SentencePiece one); the family's
``transformers`` class (GPT2LMHeadModel, LlamaForCausalLM, T5ForConditionalGeneration; for BERT,
by its heads, BertForMaskedLM, BertForPreTraining or BertForSequenceClassification, whose
config.json names the classes in ``id2label``; config.json's ``architectures``) and
``AutoTokenizer`` load it. The
converted weights are first loaded strictly into that class (built on the meta device) and the
tokenizer is converted, so a name or shape the class would not take, or a tokenizer Hugging Face
cannot reproduce, fails the export before it writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from megatrain.data.tokenizer.convert_to_hf import to_hf_tokenizer
from megatrain.errors import ConfigError
from megatrain.models.registry import spec_for_config
from megatrain.training.checkpoint import read_meta, resolve_checkpoint_path
from megatrain.training.pretrained import load_trained_model


def export(checkpoint: str | Path, out: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Write the Hugging Face directory ``out`` for ``checkpoint`` (a checkpoint or run folder).

    ``labels``: a classifier's class names, index = class id (a ``cls`` corpus manifest's task
    labels), written as config.json's ``id2label`` / ``label2id``; by default the checkpoint's
    meta.json ``labels`` when it has them, else transformers' ``LABEL_<i>``."""
    model, tokenizer = load_trained_model(checkpoint)
    spec = spec_for_config(model.config)
    if spec.hf is None:
        raise ConfigError(f"model.family={spec.family} has no Hugging Face adapter")
    hf_config = spec.hf.hf_config(model.config)
    if labels is None:
        labels = read_meta(resolve_checkpoint_path(Path(checkpoint))).get("labels")
    if labels is not None:
        _name_classes(hf_config, model.config, labels)
    hf_config.bos_token_id, hf_config.eos_token_id = _id(tokenizer.bos_id), _id(tokenizer.eos_id)
    hf_config.pad_token_id = _id(tokenizer.pad_id)
    hf_state_dict = spec.hf.state_dict_to_hf(model.state_dict())
    spec.hf.check_loads(hf_config, hf_state_dict)  # before anything is written
    hf_tok = to_hf_tokenizer(tokenizer)  # also: a tokenizer that cannot convert writes nothing
    state_dict = _without_aliases(hf_state_dict)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    hf_tok.save(out)
    return out


def _name_classes(hf_config: Any, config: Any, labels: Sequence[str]) -> None:
    """config.json's ``id2label`` / ``label2id`` from the class names (index = class id)."""
    classes = getattr(config, "num_labels", 0)
    if len(labels) != classes or len(set(labels)) != len(labels):
        raise ConfigError(f"{len(labels)} label names ({', '.join(map(str, labels[:3]))}...) for "
                          f"a model with {classes} classes: give one distinct name per class")
    hf_config.id2label = {i: str(name) for i, name in enumerate(labels)}
    hf_config.label2id = {str(name): i for i, name in enumerate(labels)}


def _without_aliases(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop every later name of a tensor stored under an earlier one (a tied output head is the
    token embedding): safetensors stores a tensor once and transformers re-ties on load."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state_dict.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor
    return out


def _id(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None
