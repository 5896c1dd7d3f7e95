"""GPT-2: learned positions, pre-LayerNorm blocks, tanh-GELU MLP, tied input/output embeddings.

The layout follows Hugging Face's GPT2LMHeadModel exactly (see ``megatrain.models.hf.gpt2``), so a
checkpoint converts both ways and the logits match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from megatrain.models.common.attention import SelfAttention, resolve_attn_impl
from megatrain.models.common.layers import Block, GeluMLP, RMSNorm
from megatrain.models.common.positions import batch_mask, positions_in_documents
from megatrain.models.flops import palm_flops_per_token


@dataclass
class GPTConfig:
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    vocab_size: int
    max_seq_len: int
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


def _block(config: GPTConfig, attn_impl: str) -> Block:
    d = config.d_model
    attn = SelfAttention(d, config.n_heads, config.n_heads, attn_impl, config.dropout)
    return Block(nn.LayerNorm(d), attn, nn.LayerNorm(d), GeluMLP(d, config.d_ff, config.dropout))


class GPT(nn.Module):
    """GPT-2 language model: ``forward(input_ids (B, T)) -> logits (B, T, V)``; no loss inside."""

    def __init__(
        self,
        config: GPTConfig,
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
            self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(_block(config, self.attn_impl)
                                        for _ in range(config.n_layers))
            self.ln_f = nn.LayerNorm(config.d_model)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        self.reset_parameters()
        self.to(dtype=dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_weights(self, self.blocks, self.config.n_layers)

    def num_params(self, non_embedding: bool = True) -> int:
        """Counted parameters (tied weights once); ``non_embedding`` drops the position table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                doc_ids: Tensor | None = None) -> Tensor:
        """``attention_mask`` (B, T): 1 for tokens, 0 for padding (as in Hugging Face);
        ``doc_ids`` (B, T): packed documents, each attending only to itself, positions restarting."""
        T = input_ids.size(1)
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        pos = torch.arange(T, device=input_ids.device) if doc_ids is None \
            else positions_in_documents(doc_ids)  # (T,) or (B, T)
        mask = batch_mask(attention_mask, doc_ids)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x, None, mask)  # (B, T, C)
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def build_gpt(config: GPTConfig, device: torch.device | str, dtype: torch.dtype) -> GPT:
    """The registry's build function."""
    return GPT(config, device=device, dtype=dtype)


def gpt_flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's formula."""
    return palm_flops_per_token(config.num_params(non_embedding=True), config.n_layers,
                                config.d_model, seq_len)
