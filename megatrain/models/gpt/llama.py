"""Llama-style GPT: rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no biases.

Same pre-norm block and attention module as GPT-2 (``megatrain.models.common``); the layout maps
one to one onto Hugging Face's LlamaForCausalLM (see ``megatrain.models.hf.llama``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from megatrain.models.common.attention import SelfAttention, resolve_attn_impl
from megatrain.models.common.layers import Block, GatedMLP, RMSNorm
from megatrain.models.common.positions import batch_mask, positions_in_documents
from megatrain.models.common.rotary import rotary_cos_sin
from megatrain.models.flops import palm_flops_per_token
from megatrain.models.gpt.model import init_weights


@dataclass
class LlamaConfig:
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    vocab_size: int
    max_seq_len: int
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


def _block(config: LlamaConfig, attn_impl: str) -> Block:
    d, eps = config.d_model, config.norm_eps
    attn = SelfAttention(d, config.n_heads, config.n_kv_heads, attn_impl, config.dropout,
                               bias=False)
    mlp = GatedMLP(d, config.d_ff, config.dropout, activation="silu")  # SwiGLU
    return Block(RMSNorm(d, eps), attn, RMSNorm(d, eps), mlp)


class Llama(nn.Module):
    """Llama-style language model: ``forward(input_ids (B, T)) -> logits (B, T, V)``."""

    def __init__(
        self,
        config: LlamaConfig,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Build on ``device`` in ``dtype``; the attention backend is resolved for them here."""
        super().__init__()
        self.config = config
        self.attn_impl = resolve_attn_impl(config.attn_impl, torch.device(device), dtype)
        with torch.device(device):
            self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(_block(config, self.attn_impl)
                                        for _ in range(config.n_layers))
            self.ln_f = RMSNorm(config.d_model, config.norm_eps)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()
        self.to(dtype=dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_weights(self, self.blocks, self.config.n_layers)

    def num_params(self) -> int:
        """Counted parameters (a tied head once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                doc_ids: Tensor | None = None) -> Tensor:
        """``attention_mask`` (B, T): 1 for tokens, 0 for padding (as in Hugging Face);
        ``doc_ids`` (B, T): packed documents, each attending only to itself, positions restarting."""
        T = input_ids.size(1)
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        head_dim = self.config.d_model // self.config.n_heads
        positions = None if doc_ids is None else positions_in_documents(doc_ids)
        rope = rotary_cos_sin(T, head_dim, self.config.rope_theta, input_ids.device, positions)
        mask = batch_mask(attention_mask, doc_ids)
        x = self.drop(self.tok_emb(input_ids))  # (B, T, C)
        for block in self.blocks:
            x = block(x, rope, mask)  # (B, T, C)
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def build_llama(config: LlamaConfig, device: torch.device | str, dtype: torch.dtype) -> Llama:
    """The registry's build function."""
    return Llama(config, device=device, dtype=dtype)


def llama_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's formula; N is every parameter."""
    return palm_flops_per_token(config.num_params(), config.n_layers, config.d_model, seq_len)
