"""Llama-style GPT: rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no biases.

Same pre-norm block and attention module as GPT-2 (``megatrain.models.common``); the layout maps
one to one onto Hugging Face's LlamaForCausalLM (see ``megatrain.models.llama.hf``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from megatrain.models.common.attention import SelfAttention
from megatrain.models.common.base import TransformerConfig
from megatrain.models.common.decoder import DecoderLM
from megatrain.models.common.layers import Block, GatedMLP, RMSNorm
from megatrain.models.common.positions import positions_in_documents
from megatrain.models.common.rotary import rotary_cos_sin
from megatrain.models.flops import palm_flops_per_token


@dataclass
class LlamaConfig(TransformerConfig):
    n_kv_heads: int | None = None  # None: n_heads (plain multi-head attention)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0
    attn_impl: str = "auto"  # auto | flash_attn | sdpa | eager

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads

    def num_params(self) -> int:
        """Parameter count from the dims alone; a tied head is counted once.

        There are no position embeddings, so this is also the N of the FLOPs formula.
        """
        d, ff, L = self.d_model, self.d_ff, self.n_layers
        kv_dim = self.n_kv_heads * (d // self.n_heads)
        per_block = (
            2 * d  # ln_1, ln_2
            + d * (d + 2 * kv_dim)  # attn.qkv
            + d * d  # attn.proj
            + 3 * d * ff  # mlp.gate, mlp.fc, mlp.proj
        )
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + L * per_block + d + head  # tok_emb, blocks, ln_f, lm_head


class Llama(DecoderLM[LlamaConfig]):
    """Llama-style language model: ``forward(input_ids (B, T)) -> logits (B, T, V)``."""

    def block(self) -> Block:
        c = self.config
        attn = SelfAttention(c.d_model, c.n_heads, c.n_kv_heads, self.attn_impl, c.dropout,
                             bias=False)
        mlp = GatedMLP(c.d_model, c.d_ff, c.dropout, activation="silu")  # SwiGLU
        return Block(self.norm(), attn, self.norm(), mlp)

    def norm(self) -> nn.Module:
        return RMSNorm(self.config.d_model, self.config.norm_eps)

    def tied_embeddings(self) -> bool:
        return self.config.tie_embeddings

    def embed(self, input_ids: Tensor, doc_ids: Tensor | None,
              positions: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if positions is None and doc_ids is not None:
            positions = positions_in_documents(doc_ids)
        head_dim = self.config.d_model // self.config.n_heads
        rope = rotary_cos_sin(input_ids.size(1), head_dim, self.config.rope_theta,
                              input_ids.device, positions)
        return self.drop(self.tok_emb(input_ids)), rope


def build_llama(config: LlamaConfig, device: torch.device | str, dtype: torch.dtype) -> Llama:
    """The registry's build function."""
    return Llama(config, device=device, dtype=dtype)


def llama_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's formula; N is every parameter."""
    return palm_flops_per_token(config.num_params(), config.n_layers, config.d_model, seq_len)
