"""BERT: word + learned position + token-type embeddings, post-LayerNorm encoder blocks with exact
GELU, and its heads, as Hugging Face lays them out:

- the masked-LM head (dense -> GELU -> LayerNorm -> decoder tied to the word embeddings):
  ``forward`` returns token logits (B, T, V), as ``BertForMaskedLM``;
- with ``nsp``, also the pooler (dense -> tanh on the [CLS] position) and the 2-way
  next-sentence head: ``(token logits (B, T, V), nsp logits (B, 2))``, as ``BertForPreTraining``;
- with ``num_labels > 0``, the pooler, dropout and a classifier instead of the MLM head: class
  logits (B, num_labels), as ``BertForSequenceClassification``.

Each layout converts both ways with its Hugging Face class (see ``megatrain.models.bert.hf``)
and the logits match. Attention is bidirectional; padding and packed documents are masked
through the shared attention backends.

``norm_position="pre"`` builds the shared pre-norm ``Block`` instead (stabler at depth and at high
learning rates). As in Megatron-LM's BERT it then drops the embedding LayerNorm and normalises once
more after the last block (``ln_f``); the parameter count is unchanged. It has no BertForMaskedLM
counterpart, so it cannot be exported (it trains with every head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatrain.errors import ConfigError
from megatrain.models.common.attention import AttnMask, SelfAttention
from megatrain.models.common.base import ModelBase, TransformerConfig
from megatrain.models.common.chunked_ce import LMHead
from megatrain.models.common.layers import Block, GeluMLP
from megatrain.models.common.positions import batch_mask, token_positions
from megatrain.models.flops import palm_flops_per_token

NORM_POSITIONS = ("post", "pre")


@dataclass
class BertConfig(TransformerConfig):
    type_vocab_size: int = 2  # segment embeddings; MLM pretraining without NSP uses type 0 only
    norm_position: str = "post"  # post (as in BERT) | pre
    norm_eps: float = 1e-12
    dropout: float = 0.0
    attn_impl: str = "auto"  # auto | flash_attn | sdpa | eager
    # The task heads, set from the run's data (``registry.with_heads``), not from model.*:
    num_labels: int = 0  # > 0: a sequence classifier over that many classes, no MLM head
    nsp: bool = False  # the MLM head plus the pooler and a next-sentence (2-way) head

    def __post_init__(self) -> None:
        if self.norm_position not in NORM_POSITIONS:
            raise ConfigError(f"model.norm_position={self.norm_position} is not a norm position; "
                              f"valid: {', '.join(NORM_POSITIONS)}")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 1:
            raise ConfigError(f"model.type_vocab_size={self.type_vocab_size} must be a positive "
                              "integer")
        if not isinstance(self.num_labels, int) or self.num_labels < 0:
            raise ConfigError(f"num_labels={self.num_labels} must be a non-negative integer")
        if self.num_labels and self.nsp:
            raise ConfigError("a BERT model is a classifier (num_labels) or a next-sentence "
                              "pretrainer (nsp), not both")

    @property
    def pooled(self) -> bool:
        """Whether the model has the pooler (classification and NSP read the pooled [CLS])."""
        return self.num_labels > 0 or self.nsp

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count from the dims alone; the tied decoder weight is counted once.

        ``non_embedding`` leaves out the position and token-type tables (lookups, not matmuls);
        the word embedding stays when it is also the MLM decoder's weight (the PaLM convention),
        and is left out too by a classifier, which only looks it up.
        """
        d, ff, L, V = self.d_model, self.d_ff, self.n_layers, self.vocab_size
        per_block = (
            d * 3 * d + 3 * d  # attn.qkv
            + d * d + d  # attn.proj
            + 2 * d  # ln_1
            + d * ff + ff  # mlp.fc
            + ff * d + d  # mlp.proj
            + 2 * d  # ln_2
        )
        mlm = 0 if self.num_labels else d * d + d + 2 * d + V  # head.dense, .ln, .decoder.bias
        n = V * d + 2 * d + L * per_block + mlm + self.sequence_head_params()
        # tok_emb, emb_ln (post) or ln_f (pre), blocks, heads
        lookups = (self.max_seq_len + self.type_vocab_size) * d  # pos_emb, type_emb
        if non_embedding:
            return n - V * d if self.num_labels else n
        return n + lookups

    def sequence_head_params(self) -> int:
        """Parameters that run once per sequence, not per token: the pooler and the classifier
        or next-sentence head (none in a plain MLM)."""
        d = self.d_model
        pooler = d * d + d if self.pooled else 0
        return pooler + (d + 1) * self.num_labels + (2 * d + 2 if self.nsp else 0)


class PostNormBlock(nn.Module):
    """One post-norm block as in the original Transformer and BERT: each sub-layer's residual sum
    is normalised (``ln_1`` after attention, ``ln_2`` after the MLP). Same submodule names and
    call signature as the shared pre-norm ``Block``, so checkpointing and compile treat it alike.
    """

    def __init__(self, ln_1: nn.Module, attn: nn.Module, ln_2: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                mask: AttnMask | None = None) -> Tensor:
        x = self.ln_1(x + self.attn(x, rope, mask))
        return self.ln_2(x + self.mlp(x))


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder; the model ties ``decoder.weight`` to the word
    embeddings, the bias is the head's own. With labels the decoder returns the summed loss
    (``LMHead``): the transform runs on every token, only the decoder's logits are chunked."""

    def __init__(self, d_model: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.ln = nn.LayerNorm(d_model, eps=eps)
        self.decoder = LMHead(d_model, vocab_size)

    def forward(self, x: Tensor, labels: Tensor | None = None, loss_chunk: int = 0) -> Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(x))), labels, loss_chunk)


class Pooler(nn.Module):
    """Hugging Face's BertPooler: dense -> tanh on the first ([CLS]) position."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))  # (B, C)


def _block(config: BertConfig, attn_impl: str) -> nn.Module:
    d, eps = config.d_model, config.norm_eps
    attn = SelfAttention(d, config.n_heads, config.n_heads, attn_impl, config.dropout,
                         causal=False)
    mlp = GeluMLP(d, config.d_ff, config.dropout, approximate="none")  # exact GELU
    block = Block if config.norm_position == "pre" else PostNormBlock
    return block(nn.LayerNorm(d, eps=eps), attn, nn.LayerNorm(d, eps=eps), mlp)


@torch.no_grad()
def init_bert_weights(model: nn.Module) -> None:
    """Hugging Face BERT's init: N(0, 0.02) for linear and embedding weights (no residual
    scaling: post-LN renormalises every sub-layer), zero biases, unit LayerNorms."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.zero_()
        if isinstance(module, nn.LayerNorm):
            module.reset_parameters()


class Bert(ModelBase[BertConfig]):
    """BERT: ``forward(input_ids (B, T))`` -> MLM logits (B, T, V) at every position, or with
    ``nsp`` (those, NSP logits (B, 2)), or with ``num_labels`` class logits (B, num_labels) (the
    module docstring); no loss inside (the trainer scores the masked positions only)."""

    head_modules = ("head", "pooler", "nsp_head", "classifier")

    @property
    def lookup_tables(self) -> tuple[str, ...]:  # type: ignore[override]
        """A classifier has no decoder: its word embedding is a lookup as well."""
        return ("pos_emb", "type_emb") + (("tok_emb",) if self.config.num_labels else ())

    def build(self) -> None:
        c = self.config
        d, eps, post = c.d_model, c.norm_eps, c.norm_position == "post"
        self.tok_emb = nn.Embedding(c.vocab_size, d)
        self.pos_emb = nn.Embedding(c.max_seq_len, d)
        self.type_emb = nn.Embedding(c.type_vocab_size, d)
        self.emb_ln = nn.LayerNorm(d, eps=eps) if post else nn.Identity()
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(_block(c, self.attn_impl) for _ in range(c.n_layers))
        self.ln_f = nn.Identity() if post else nn.LayerNorm(d, eps=eps)
        if not c.num_labels:
            self.head = MLMHead(d, c.vocab_size, eps)
            self.head.decoder.weight = self.tok_emb.weight  # tied
        if c.pooled:
            self.pooler = Pooler(d)
        if c.nsp:
            self.nsp_head = nn.Linear(d, 2)  # HF's cls.seq_relationship
        if c.num_labels:
            self.classifier = nn.Linear(d, c.num_labels)

    def reset_parameters(self) -> None:
        init_bert_weights(self)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                doc_ids: Tensor | None = None, token_type_ids: Tensor | None = None, *,
                labels: Tensor | None = None, loss_chunk: int = 0
                ) -> Tensor | tuple[Tensor, Tensor]:
        """``attention_mask`` (B, T): 1 for tokens, 0 for padding (as in Hugging Face);
        ``doc_ids`` (B, T): packed documents, each attending only to itself, positions restarting;
        ``token_type_ids`` (B, T): segments, all 0 when None (no sentence pairs in pretraining);
        ``labels`` (B, T): the MLM loss summed over the labelled tokens in place of the token
        logits (``LMHead``); a classifier ignores them."""
        self.check_seq_len(input_ids.size(1))
        pos = token_positions(input_ids, doc_ids)  # (T,) or (B, T)
        types = self.type_emb.weight[0] if token_type_ids is None \
            else self.type_emb(token_type_ids)  # (C,) or (B, T, C)
        mask = batch_mask(attention_mask, doc_ids)
        x = self.tok_emb(input_ids) + types + self.pos_emb(pos)  # (B, T, C), HF's order of sums
        x = self.drop(self.emb_ln(x))
        for block in self.blocks:
            x = block(x, None, mask)  # (B, T, C)
        x = self.ln_f(x)
        if self.config.num_labels:  # HF applies dropout to the pooled output, then classifies
            return self.classifier(self.drop(self.pooler(x)))  # (B, num_labels)
        logits = self.head(x, labels, loss_chunk)  # (B, T, V), or the summed loss
        if self.config.nsp:
            return logits, self.nsp_head(self.pooler(x))  # (B, 2): 0 = B follows A
        return logits


def build_bert(config: BertConfig, device: torch.device | str, dtype: torch.dtype) -> Bert:
    """The registry's build function."""
    return Bert(config, device=device, dtype=dtype)


def bert_flops_per_token(config: BertConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's formula. The decoder runs at every
    position (the model does not know which are masked), so its matmul is counted in full; the
    pooler and the classifier or NSP head run once per sequence, so theirs is spread over its
    ``seq_len`` tokens."""
    per_sequence = config.sequence_head_params()
    return palm_flops_per_token(config.num_params(non_embedding=True) - per_sequence,
                                config.n_layers, config.d_model, seq_len
                                ) + 6.0 * per_sequence / seq_len
