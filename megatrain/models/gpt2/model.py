"""GPT-2: learned positions, pre-LayerNorm blocks, tanh-GELU MLP, tied input/output embeddings.

The layout follows Hugging Face's GPT2LMHeadModel exactly (see ``megatrain.models.gpt2.hf``), so a
checkpoint converts both ways and the logits match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from megatrain.models.common.attention import SelfAttention
from megatrain.models.common.base import TransformerConfig
from megatrain.models.common.decoder import DecoderLM
from megatrain.models.common.layers import Block, GeluMLP
from megatrain.models.common.positions import token_positions
from megatrain.models.flops import palm_flops_per_token


@dataclass
class GPTConfig(TransformerConfig):
    dropout: float = 0.0
    attn_impl: str = "auto"  # auto | flash_attn | sdpa | eager

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count from the dims alone (no model needed, so it works for any size).

        ``non_embedding`` leaves out the position embeddings only: the token embedding is also the
        output projection (tied), whose matmul is real compute (the nanoGPT / PaLM convention).
        """
        d, ff, L = self.d_model, self.d_ff, self.n_layers
        per_block = (
            2 * d  # ln_1
            + d * 3 * d + 3 * d  # attn.qkv
            + d * d + d  # attn.proj
            + 2 * d  # ln_2
            + d * ff + ff  # mlp.fc
            + ff * d + d  # mlp.proj
        )
        n = self.vocab_size * d + L * per_block + 2 * d  # tok_emb, blocks, ln_f
        return n if non_embedding else n + self.max_seq_len * d


class GPT(DecoderLM[GPTConfig]):
    """GPT-2 language model: ``forward(input_ids (B, T)) -> logits (B, T, V)``; no loss inside."""

    lookup_tables = ("pos_emb",)

    def build_positions(self) -> None:
        self.pos_emb = nn.Embedding(self.config.max_seq_len, self.config.d_model)

    def block(self) -> Block:
        c = self.config
        attn = SelfAttention(c.d_model, c.n_heads, c.n_heads, self.attn_impl, c.dropout)
        return Block(self.norm(), attn, self.norm(), GeluMLP(c.d_model, c.d_ff, c.dropout))

    def norm(self) -> nn.Module:
        return nn.LayerNorm(self.config.d_model)

    def tied_embeddings(self) -> bool:
        return True

    def embed(self, input_ids: Tensor, doc_ids: Tensor | None,
              positions: Tensor | None = None) -> tuple[Tensor, None]:
        pos = token_positions(input_ids, doc_ids) if positions is None else positions  # (T,)|(B, T)
        return self.drop(self.tok_emb(input_ids) + self.pos_emb(pos)), None


def build_gpt(config: GPTConfig, device: torch.device | str, dtype: torch.dtype) -> GPT:
    """The registry's build function."""
    return GPT(config, device=device, dtype=dtype)


def gpt_flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's formula."""
    return palm_flops_per_token(config.num_params(non_embedding=True), config.n_layers,
                                config.d_model, seq_len)
