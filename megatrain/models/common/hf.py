"""What every family's Hugging Face adapter (``models/<family>/hf.py``) is made of: the
adapter record, config field tables, reading a model folder's weights.

``transformers`` is an optional dependency (``megatrain[hf]``), so it is imported inside the
functions that need it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatrain.errors import ConfigError, MegatrainError
from megatrain.models.common.keymap import StateDict

Fields = tuple[tuple[str, str], ...]  # (megatrain config field, HF config attribute) pairs


@dataclass(frozen=True)
class HFAdapter:
    """What the export CLI and ``model.init_from=hf:DIR`` need from one family."""

    model_type: str  # config.json's "model_type", e.g. "gpt2"
    # the transformers class name, e.g. "GPT2LMHeadModel"; a family whose models differ in heads
    # (BERT) names its plain model's, and its ``config_to_hf`` sets ``architectures`` itself
    architecture: str
    config_to_hf: Callable[[Any], Any]
    config_from_hf: Callable[[Any], Any]
    state_dict_to_hf: Callable[[StateDict], StateDict]
    state_dict_from_hf: Callable[[StateDict], StateDict]

    def hf_config(self, config: Any) -> Any:
        """``config_to_hf``, naming the class that loads it (config.json's ``architectures``,
        which AutoModel and the Hub read): ``architecture`` unless ``config_to_hf`` named one."""
        hf_config = self.config_to_hf(config)
        hf_config.architectures = hf_config.architectures or [self.architecture]
        return hf_config

    def architecture_of(self, hf_config: Any) -> str:
        """The transformers class name of an HF config made by :meth:`hf_config`."""
        return (hf_config.architectures or [self.architecture])[0]

    def check_loads(self, hf_config: Any, hf_state_dict: StateDict) -> None:
        """Load ``hf_state_dict`` strictly into ``architecture`` built (on the meta device, so
        for free) from ``hf_config``: a name or shape transformers would not take is an error
        here, naming it, instead of a model that silently keeps random weights. (A copy of the
        config: building a model may set attributes on it.)"""
        architecture = self.architecture_of(hf_config)
        model_cls = getattr(import_transformers(), architecture)
        with torch.device("meta"):
            model = model_cls(copy.deepcopy(hf_config))
        try:
            model.load_state_dict(hf_state_dict, strict=True, assign=True)
        except RuntimeError as e:
            raise MegatrainError(f"the converted weights do not load into {architecture}: "
                                 + " ".join(str(e).split())) from e


def fields_to_hf(fields: Fields, config: Any) -> dict[str, Any]:
    """The HF config arguments that carry a megatrain config field unchanged."""
    return {hf: getattr(config, mt) for mt, hf in fields}


def fields_from_hf(fields: Fields, hf_config: Any) -> dict[str, Any]:
    """The megatrain config arguments read unchanged from an HF config: the same table as
    ``fields_to_hf``, so the two directions cannot disagree."""
    return {mt: getattr(hf_config, hf) for mt, hf in fields}


def import_transformers() -> Any:
    """The ``transformers`` module, or a ConfigError that says how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(f"Hugging Face conversion needs transformers ({e}); "
                          "pip install 'megatrain[hf]'") from e
    return transformers


def read_hf_weights(directory: Path) -> StateDict:
    """model.safetensors, sharded safetensors (model.safetensors.index.json) or
    pytorch_model.bin, whichever the directory has, on the CPU."""
    from safetensors.torch import load_file

    if (directory / "model.safetensors").is_file():
        return load_file(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(directory / shard).items()}
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ConfigError(f"{directory} has no model.safetensors, model.safetensors.index.json or "
                      "pytorch_model.bin")


__all__ = ["Fields", "HFAdapter", "StateDict", "fields_from_hf", "fields_to_hf",
           "import_transformers", "read_hf_weights"]
