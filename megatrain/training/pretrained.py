"""Trained models from elsewhere: a megatrain checkpoint or a Hugging Face folder, as
``model.init_from`` starts from them, and as generate and export load them.

A fine-tune may start from weights with other task heads (a masked LM becoming a classifier):
``pretrained_config`` gives the pretrained body the run's heads and ``load_pretrained_weights``
loads the shared weights, keeping the new heads as the model initialised them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatrain.config.schema import ModelConfig
from megatrain.data.tokenizer import Tokenizer, load_tokenizer
from megatrain.errors import ConfigError
from megatrain.models.common.heads import load_fitted
from megatrain.models.registry import (
    check_heads,
    get_model_spec,
    load_hf_pretrained,
    with_heads,
)

HF_PREFIX = "hf:"
log = logging.getLogger("megatrain")


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
                      weights: bool = True, *, num_labels: int = 0, nsp: bool = False
                      ) -> tuple[Any, dict | None]:
    """The starting config and weights for ``model.init_from=source``, checked against the run:
    the same family, a vocabulary that covers the tokenizer's; the run's attn_impl and dropout
    apply (they are not part of the weights), and so do the run's task heads (``num_labels``,
    ``nsp``: ``registry.with_heads``), whatever heads ``source`` has. ``weights=False`` (a run
    that resumes: its checkpoint has newer ones) reads the config only. Load the weights with
    :func:`load_pretrained_weights`."""
    check_heads(model_cfg.family, num_labels, nsp)
    family, config, state_dict = load_pretrained(source, weights)
    if family != model_cfg.family:
        raise ConfigError(_wrong_family(source, family, model_cfg.family, num_labels, nsp))
    if config.vocab_size < vocab_size:
        raise ConfigError(f"model.init_from={source} has a vocabulary of {config.vocab_size}, "
                          f"smaller than the corpus tokenizer's {vocab_size}: prepare the corpus "
                          "with that model's tokenizer")
    config = with_heads(config, num_labels=num_labels, nsp=nsp)
    config.attn_impl, config.dropout = model_cfg.attn_impl, model_cfg.dropout
    return config, state_dict


def _wrong_family(source: str, family: str, run_family: str, num_labels: int, nsp: bool) -> str:
    """One line: the checkpoint's family and the run's, and what to change."""
    if num_labels or nsp:  # the run's family is the one that has the heads its data needs
        what = "data.objective=cls" if num_labels else "data.nsp"
        return (f"model.init_from={source} is a {family} model, but model.family={run_family} "
                f"and {what} needs a {run_family} model; start from a {run_family} checkpoint")
    return (f"model.init_from={source} is a {family} model, but model.family={run_family}; "
            f"set model.family={family}")


def load_pretrained_weights(model: nn.Module, state_dict: dict[str, torch.Tensor],
                            source: str) -> None:
    """Load ``model.init_from=source``'s weights into ``model`` (built from
    :func:`pretrained_config`'s config): the shared ones are loaded; the model's heads that
    ``source`` lacks, or has in other shapes (another number of classes), keep the family's
    initialisation the model was built with; ``source``'s other heads are dropped. A tensor
    missing or extra outside the heads is a ConfigError naming the first one."""
    fresh = load_fitted(model, state_dict, f"model.init_from={source}")
    if fresh:
        heads = sorted({name.split(".", 1)[0] for name in fresh})
        log.info("model.init_from=%s has no %s: initialised afresh", source, ", ".join(heads))


def load_trained_model(checkpoint: str | Path,
                       device: torch.device | str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """A plain fp32 model in eval mode and its tokenizer, from a checkpoint, checkpoints or run
    folder."""
    from megatrain.training.checkpoint import resolve_checkpoint_path

    family, config, state_dict = load_checkpoint_model(checkpoint)  # the heads it trained
    model = get_model_spec(family).build(config, device, torch.float32)
    model.load_state_dict(state_dict)
    return model.eval(), load_tokenizer(resolve_checkpoint_path(Path(checkpoint)))
