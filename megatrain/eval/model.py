"""The model under evaluation: a megatrain checkpoint (or run folder) or a Hugging Face folder
(``hf:DIR``, as ``model.init_from`` takes it), in fp32 eval mode, with its tokenizer and, for a
classifier, its class names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatrain.data.tokenizer import Tokenizer, load_tokenizer
from megatrain.errors import ConfigError
from megatrain.models.registry import get_model_spec, spec_for_config
from megatrain.models.spec import ModelSpec
from megatrain.training.pretrained import (
    HF_PREFIX,
    hf_directory,
    load_pretrained,
    load_pretrained_weights,
    load_trained_model,
)


@dataclass
class EvalModel:
    """A loaded model and what the tasks ask of it."""

    source: str  # as given: a checkpoint path or hf:DIR
    model: nn.Module
    tokenizer: Tokenizer
    tokenizer_file: Path
    labels: list[str] | None  # a classifier's class names (index = class id), when known
    resolved: str = ""  # the checkpoint folder a run folder named, or the hf: folder

    @property
    def spec(self) -> ModelSpec:
        return spec_for_config(self.model.config)

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_seq_len(self) -> int:
        return int(self.model.config.max_seq_len)


def load_eval_model(source: str, device: torch.device | str = "cpu") -> EvalModel:
    """``source`` (a checkpoint, checkpoints or run folder, or ``hf:DIR``) loaded for eval."""
    if source.startswith(HF_PREFIX):
        return _load_hf(source, device)
    from megatrain.training.checkpoint import read_meta, resolve_checkpoint_path

    path = resolve_checkpoint_path(Path(source))
    model, tokenizer = load_trained_model(source, device)
    labels = read_meta(path).get("labels")
    return EvalModel(source, model, tokenizer, tokenizer.path, labels, str(path))


def _load_hf(source: str, device: torch.device | str) -> EvalModel:
    """A Hugging Face folder through megatrain's adapters (the same weights, megatrain's model)."""
    folder = hf_directory(source[len(HF_PREFIX):])
    family, config, state_dict = load_pretrained(source)
    model = get_model_spec(family).build(config, device, torch.float32)
    load_pretrained_weights(model, state_dict, source)
    tokenizer = load_tokenizer(folder)
    return EvalModel(source, model.eval(), tokenizer, tokenizer.path, _hf_labels(folder, config),
                     str(folder))


def _hf_labels(folder: Path, config: Any) -> list[str] | None:
    """config.json's ``id2label`` as a list, for a classifier."""
    classes = getattr(config, "num_labels", 0)
    if not classes:
        return None
    id2label = json.loads((folder / "config.json").read_text()).get("id2label") or {}
    names = [id2label.get(str(i)) for i in range(classes)]
    return None if None in names else [str(n) for n in names]


FAMILY_TASKS = {"gpt": "perplexity, bleu, rouge", "llama": "perplexity, bleu, rouge",
                "bert": "mlm", "t5": "target_loss, bleu, rouge"}
"""What to suggest instead, by family (a BERT classifier: accuracy)."""


def require(loaded: EvalModel, task: str, *, families: tuple[str, ...] = (),
            generates: bool = False, classifier: bool | None = None) -> None:
    """ConfigError in one line when ``task`` cannot run on ``loaded``'s model, naming the tasks
    that can."""
    family = loaded.family
    num_labels = getattr(loaded.model.config, "num_labels", 0)
    ok = (not families or family in families) and (not generates or loaded.spec.generates)
    if classifier is not None:
        ok = ok and bool(num_labels) == classifier
    if ok:
        return
    what = f"a {family} classifier" if num_labels else f"a {family} model"
    if generates:
        needs = "a model that generates text (gpt, llama or t5)"
    else:
        needs = "a " + " or ".join(families) + (" classifier" if classifier else " model")
    tasks = "accuracy" if num_labels else FAMILY_TASKS.get(family, "")
    raise ConfigError(f"--task {task} needs {needs}; {loaded.source} is {what} "
                      f"(its tasks: {tasks})")
