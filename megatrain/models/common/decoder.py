"""What GPT-2 and the Llama-style model share: token embedding, pre-norm blocks, a final norm and
the LM head, and GPT-2's init. They differ only in the blocks and norms they make and in how
positions enter (a learned table or rotary angles)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from megatrain.models.common.attention import KVCache
from megatrain.models.common.base import ConfigT, ModelBase
from megatrain.models.common.chunked_ce import LMHead
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
        self.lm_head = LMHead(c.d_model, c.vocab_size, bias=False)
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

    def embed(self, input_ids: Tensor, doc_ids: Tensor | None, positions: Tensor | None = None,
              ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """(B, T) tokens, positions restarting per document when ``doc_ids`` is given, or taken
        from ``positions`` (B, T) (generation: after left padding, after the cache) -> the
        blocks' input (B, T, C) and the rotary (cos, sin) they apply, if any."""
        raise NotImplementedError

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_weights(self, self.blocks, self.config.n_layers)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                doc_ids: Tensor | None = None, *, positions: Tensor | None = None,
                cache: KVCache | None = None, labels: Tensor | None = None,
                loss_chunk: int = 0, last_only: bool = False) -> Tensor:
        """``attention_mask`` (B, T): 1 for tokens, 0 for padding (as in Hugging Face);
        ``doc_ids`` (B, T): packed documents, each attending only to itself, positions restarting.

        Generation: ``positions`` (B, T) are the tokens' position ids; with a ``cache`` (see
        :meth:`new_cache`) ``input_ids`` are only the new tokens, ``attention_mask`` covers the
        cached and the new ones (B, L + T), and the cache advances by T. ``last_only``: only the
        last position's logits (B, 1, V), sparing the head's matmul over a prompt.

        Training: with ``labels`` (B, T) the model returns the summed cross-entropy over the
        labelled tokens (an fp32 scalar) instead of the logits, ``loss_chunk`` rows of logits at a
        time (``LMHead``)."""
        past = 0 if cache is None else cache.length
        self.check_seq_len(past + input_ids.size(1))
        if positions is None and past:  # the new tokens follow the cached ones
            positions = torch.arange(past, past + input_ids.size(1), device=input_ids.device)[None]
        mask = batch_mask(attention_mask, doc_ids)
        x, rope = self.embed(input_ids, doc_ids, positions)  # (B, T, C)
        layers = [None] * len(self.blocks) if cache is None else cache.layers
        for block, layer in zip(self.blocks, layers, strict=True):
            x = block(x, rope, mask, layer)  # (B, T, C)
        if cache is not None:
            cache.advance(input_ids.size(1))
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.lm_head(self.ln_f(x), labels, loss_chunk)  # (B, T, V) or the loss

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for ``batch`` rows of up to ``max_len`` positions, in the model's
        dtype and device."""
        c, weight = self.config, self.lm_head.weight
        n_kv = getattr(c, "n_kv_heads", None) or c.n_heads
        return KVCache(c.n_layers, batch, n_kv, c.d_model // c.n_heads, max_len, weight.dtype,
                       weight.device)
