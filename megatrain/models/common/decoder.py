"""What GPT-2 and the Llama-style model share: token embedding, pre-norm blocks, a final norm and
the LM head, and GPT-2's init. They differ only in the blocks and norms they make and in how
positions enter (a learned table or rotary angles)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from megatrain.models.common.base import ConfigT, ModelBase
from megatrain.models.common.layers import Block, RMSNorm
from megatrain.models.common.positions import batch_mask


def init_weights(model: nn.Module, blocks: nn.ModuleList, n_layers: int) -> None:
    """GPT-2 init: N(0, 0.02), residual output projections N(0, 0.02/√(2L)), zero biases, unit
    norms. Shared by the GPT-2 and Llama-style models."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.zero_()
        if isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.reset_parameters()
    # Each block adds two outputs to the residual stream; scaling keeps its variance flat.
    resid_std = 0.02 / math.sqrt(2 * n_layers)
    for block in blocks:
        block.attn.proj.weight.normal_(mean=0.0, std=resid_std)
        block.mlp.proj.weight.normal_(mean=0.0, std=resid_std)


class DecoderLM(ModelBase[ConfigT]):
    """A decoder-only language model: ``forward(input_ids (B, T)) -> logits (B, T, V)``; no loss
    inside. Subclasses make the block and the norm, may add a position table, say whether the
    head is tied, and embed the tokens with their positions."""

    tok_emb: nn.Embedding
    blocks: nn.ModuleList

    def build(self) -> None:
        c = self.config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.build_positions()  # registered right after tok_emb: the init draws in this order
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(self.block() for _ in range(c.n_layers))
        self.ln_f = self.norm()
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if self.tied_embeddings():
            self.lm_head.weight = self.tok_emb.weight

    def build_positions(self) -> None:
        """Create learned position parameters, if the model has any (GPT-2's table)."""

    def block(self) -> Block:
        raise NotImplementedError

    def norm(self) -> nn.Module:
        raise NotImplementedError

    def tied_embeddings(self) -> bool:
        raise NotImplementedError

    def embed(self, input_ids: Tensor,
              doc_ids: Tensor | None) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """(B, T) tokens, positions restarting per document when ``doc_ids`` is given -> the
        blocks' input (B, T, C) and the rotary (cos, sin) they apply, if any."""
        raise NotImplementedError

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_weights(self, self.blocks, self.config.n_layers)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                doc_ids: Tensor | None = None) -> Tensor:
        """``attention_mask`` (B, T): 1 for tokens, 0 for padding (as in Hugging Face);
        ``doc_ids`` (B, T): packed documents, each attending only to itself, positions restarting."""
        self.check_seq_len(input_ids.size(1))
        mask = batch_mask(attention_mask, doc_ids)
        x, rope = self.embed(input_ids, doc_ids)  # (B, T, C)
        for block in self.blocks:
            x = block(x, rope, mask)  # (B, T, C)
        return self.lm_head(self.ln_f(x))  # (B, T, V)
