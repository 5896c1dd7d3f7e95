"""Trained models from elsewhere: a megatrain checkpoint or a Hugging Face folder, as
``model.init_from`` starts from them, and as generate and export load them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatrain.config.schema import ModelConfig
from megatrain.data.tokenizer import Tokenizer, load_tokenizer
from megatrain.errors import ConfigError
from megatrain.models.registry import get_model_spec, load_hf_pretrained

HF_PREFIX = "hf:"


def load_checkpoint_model(checkpoint: str | Path, weights: bool = True
                          ) -> tuple[str, Any, dict[str, torch.Tensor] | None]:
    """(family, config, fp32 state dict or None without ``weights``) of a megatrain checkpoint,
    checkpoints or run folder."""
    from megatrain.training import checkpoint as ckpt

    path = ckpt.resolve_checkpoint_path(Path(checkpoint))
    model_meta = dict(ckpt.read_meta(path)["model"])
    family = model_meta.pop("family")
    config = get_model_spec(family).config_cls(**model_meta)
    return family, config, ckpt.load_model_weights(path) if weights else None


def load_pretrained(source: str, weights: bool = True
                    ) -> tuple[str, Any, dict[str, torch.Tensor] | None]:
    """(family, config, state dict or None without ``weights``) of ``hf:DIR`` / ``hf:ORG/NAME``
    (a Hugging Face directory or hub id) or a megatrain checkpoint path."""
    if source.startswith(HF_PREFIX):
        return load_hf_pretrained(hf_directory(source[len(HF_PREFIX):]), weights)
    return load_checkpoint_model(source, weights)


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt"]
"""What megatrain reads of a hub model: config, weights (safetensors only: a pickle from the
hub is never loaded), tokenizer files."""


def hf_directory(name: str) -> Path:
    """A local Hugging Face folder, or the snapshot of hub id ``ORG/NAME[@REVISION]`` through
    ``huggingface_hub``'s cache: downloaded when missing, taken from the cache alone with
    ``HF_HUB_OFFLINE=1``; ``HF_HOME`` / ``HF_HUB_CACHE`` say where the cache is. ConfigError in
    one line when the id is neither cached nor reachable."""
    folder = Path(name).expanduser()
    if folder.is_dir() or name.startswith((".", "/", "~")):
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = name.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.init_from=hf:{name}: not a local folder, and not in the Hugging "
                          f"Face cache or reachable ({first})") from exc


def pretrained_config(source: str, model_cfg: ModelConfig, vocab_size: int,
                      weights: bool = True) -> tuple[Any, dict | None]:
    """The starting config and weights for ``model.init_from=source``, checked against the run:
    the same family, a vocabulary that covers the tokenizer's; the run's attn_impl and dropout
    apply (they are not part of the weights). ``weights=False`` (a run that resumes: its
    checkpoint has newer ones) reads the config only."""
    family, config, state_dict = load_pretrained(source, weights)
    if family != model_cfg.family:
        raise ConfigError(f"model.init_from={source} is a {family} model, but model.family="
                          f"{model_cfg.family}; set model.family={family}")
    if config.vocab_size < vocab_size:
        raise ConfigError(f"model.init_from={source} has a vocabulary of {config.vocab_size}, "
                          f"smaller than the corpus tokenizer's {vocab_size}: prepare the corpus "
                          "with that model's tokenizer")
    config.attn_impl, config.dropout = model_cfg.attn_impl, model_cfg.dropout
    return config, state_dict


def load_trained_model(checkpoint: str | Path,
                       device: torch.device | str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """A plain fp32 model in eval mode and its tokenizer, from a checkpoint, checkpoints or run
    folder."""
    from megatrain.training.checkpoint import resolve_checkpoint_path

    family, config, state_dict = load_checkpoint_model(checkpoint)
    model = get_model_spec(family).build(config, device, torch.float32)
    model.load_state_dict(state_dict)
    return model.eval(), load_tokenizer(resolve_checkpoint_path(Path(checkpoint)))
