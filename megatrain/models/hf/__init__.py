"""Hugging Face adapters: convert configs and state dicts to and from ``transformers`` models.

``transformers`` is a dev dependency only, so adapters import it inside their functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class HFAdapter:
    """What the export CLI and ``model.init_from=hf:DIR`` need from one family."""

    architecture: str  # the transformers class name, e.g. "GPT2LMHeadModel"
    config_to_hf: Callable[[Any], Any]
    config_from_hf: Callable[[Any], Any]
    state_dict_to_hf: Callable[[StateDict], StateDict]
    state_dict_from_hf: Callable[[StateDict], StateDict]


__all__ = ["HFAdapter", "StateDict"]
