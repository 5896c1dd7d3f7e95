"""What every model family shares: the dims its config starts with; building on a device in a
dtype with the attention backend resolved for them, the sequence-length check, the parameter
count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Generic, Protocol, TypeVar

import torch
from torch import nn

from megatrain.models.common.attention import resolve_attn_impl


@dataclass
class TransformerConfig:
    """The dims every family's config starts with, in this order (positional construction and
    the registry's validation rely on it); each family adds its own fields after them."""

    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    vocab_size: int
    max_seq_len: int


class _BuildableConfig(Protocol):
    """The fields of a family's config that the base reads."""

    attn_impl: str
    max_seq_len: int


ConfigT = TypeVar("ConfigT", bound=_BuildableConfig)


class ModelBase(nn.Module, Generic[ConfigT]):
    """A family's model, built by ``Family(config, device=..., dtype=...)``: ``build`` makes the
    submodules (on ``device``, so nothing is allocated twice) and ties weights,
    ``reset_parameters`` initialises them, then the whole model is cast to ``dtype``."""

    attn_bias: ClassVar[bool] = False  # the model adds a bias to attention scores (T5)
    # Tables only looked up, never multiplied, that the family's FLOPs formula leaves out (GPT-2's
    # and BERT's learned positions, BERT's token types): ``num_params(non_embedding=True)`` too.
    lookup_tables: ClassVar[tuple[str, ...]] = ()
    # Top-level submodules that are task heads (BERT's MLM head, pooler, NSP head, classifier):
    # fine-tuning may add, drop or re-initialise them (``models.common.heads.fit_heads``).
    head_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        config: ConfigT,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Build on ``device`` in ``dtype``; the attention backend is resolved for them here
        (``auto`` takes an attention bias into account: FlexAttention on CUDA)."""
        super().__init__()
        self.config = config
        self.attn_impl = resolve_attn_impl(config.attn_impl, torch.device(device), dtype,
                                           bias=self.attn_bias)
        with torch.device(device):
            self.build()
        self.reset_parameters()
        self.to(dtype=dtype)

    def build(self) -> None:
        """Create the submodules from ``self.config`` and ``self.attn_impl``; tie weights."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def num_params(self, non_embedding: bool = True) -> int:
        """Counted parameters (tied weights once); ``non_embedding`` drops the lookup tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(getattr(self, name).weight.numel() for name in self.lookup_tables)
        return n

    def check_seq_len(self, seq_len: int) -> None:
        """Refuse inputs longer than ``config.max_seq_len`` (the position tables' size, and for
        rotary positions the length the model is meant for)."""
        if seq_len > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
