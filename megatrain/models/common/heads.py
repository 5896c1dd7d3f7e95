"""Weights from a model with other task heads: a fine-tune starts from a pretrained body.

A run whose model differs from its ``model.init_from`` weights only in heads (a masked-LM BERT
becoming a classifier, a BertForPreTraining keeping its pooler for one, a classifier with as
many classes) loads the shared weights; the model's own heads that the weights lack, or hold in
other shapes, keep the initialisation the model was built with (the family's usual one).
Anything else that differs is an error: only heads may.
"""

from __future__ import annotations

from torch import nn

from megatrain.errors import ConfigError
from megatrain.models.common.keymap import StateDict


def _is_head(model: nn.Module, name: str) -> bool:
    return name.split(".", 1)[0] in getattr(model, "head_modules", ())


def fit_heads(model: nn.Module, state_dict: StateDict, source: str
              ) -> tuple[StateDict, list[str]]:
    """(the part of ``state_dict`` that ``model`` takes, the model's head parameters it does not
    provide). Heads the model lacks are left out; a missing, extra or differently shaped tensor
    outside the heads is a ConfigError naming ``source`` and the first such key."""
    own = model.state_dict(keep_vars=True)
    extra = next((k for k in state_dict if k not in own and not _is_head(model, k)), None)
    if extra is not None:
        raise ConfigError(f"{source}: the weights have {extra}, which the model has not (only "
                          "task heads may differ)")
    body = {id(t) for k, t in own.items() if not _is_head(model, k)}
    fitted, fresh = {}, []
    for name, tensor in own.items():
        theirs = state_dict.get(name)
        if theirs is not None and theirs.shape == tensor.shape:
            fitted[name] = theirs
        elif _is_head(model, name):
            if id(tensor) not in body:  # a head tied to the body (BERT's decoder) is loaded
                fresh.append(name)
        elif theirs is None:
            raise ConfigError(f"{source}: the weights have no {name} (only task heads may be "
                              "missing)")
        else:
            raise ConfigError(f"{source}: {name} is {tuple(theirs.shape)} in the weights, "
                              f"{tuple(tensor.shape)} in the model")
    return fitted, fresh


def load_fitted(model: nn.Module, state_dict: StateDict, source: str) -> list[str]:
    """Load ``state_dict`` into ``model`` through :func:`fit_heads`; return the head parameters
    that kept their fresh initialisation."""
    fitted, fresh = fit_heads(model, state_dict, source)
    model.load_state_dict(fitted, strict=False)
    return fresh


__all__ = ["fit_heads", "load_fitted"]
