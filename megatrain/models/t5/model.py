"""T5 v1.1: an encoder–decoder with relative position biases, RMSNorm, gated-GELU MLPs, no
biases and an untied output head.

The layout follows Hugging Face's T5ForConditionalGeneration (``feed_forward_proj="gated-gelu"``)
exactly (see ``megatrain.models.t5.hf``), so a checkpoint converts both ways and the logits match:
pre-norm blocks; the encoder's self-attention is bidirectional, the decoder's causal and followed
by cross-attention to the encoder's output; attention scores are not scaled by 1/√head_dim (the
init of q folds that in); one input embedding serves both stacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from megatrain.errors import ConfigError
from megatrain.models.common.attention import (
    AttnMask,
    CrossAttention,
    KVCache,
    LayerKV,
    SelfAttention,
)
from megatrain.models.common.base import ModelBase, TransformerConfig
from megatrain.models.common.chunked_ce import LMHead
from megatrain.models.common.layers import Block, GatedMLP, RMSNorm
from megatrain.models.t5.positions import RelativePositionBias

# T5's span corruption (15% noise, mean span 3): the decoder reads about 0.22 tokens per encoder
# token (see ``span_target_ratio``); used by the FLOPs count.
NOISE_DENSITY, MEAN_SPAN = 0.15, 3.0


@dataclass
class T5Config(TransformerConfig):
    """``n_layers`` counts the encoder's layers; ``max_seq_len`` is the longest encoder input the
    data gives (relative positions have no limit)."""

    n_decoder_layers: int | None = None  # None: n_layers
    head_dim: int | None = None  # T5's d_kv; None: d_model / n_heads
    relative_buckets: int = 32
    relative_max_distance: int = 128
    norm_eps: float = 1e-6
    tie_embeddings: bool = False  # v1.1 unties; tied scales the decoder output by 1/√d (v1.0)
    decoder_start_id: int = 3  # megatrain's pad id: T5 starts decoding from pad
    dropout: float = 0.0
    attn_impl: str = "auto"  # auto | flash_attn | sdpa | flex | eager

    def __post_init__(self) -> None:
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        if self.head_dim is None and isinstance(self.n_heads, int) and self.n_heads > 0:
            if self.d_model % self.n_heads:
                raise ConfigError(f"model.d_model={self.d_model} is not divisible by "
                                  f"model.n_heads={self.n_heads}; set model.head_dim")
            self.head_dim = self.d_model // self.n_heads
        self._validate()

    def _validate(self) -> None:
        for name in ("n_decoder_layers", "head_dim", "relative_buckets",
                     "relative_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name}={value} must be a positive integer")
        if self.relative_buckets < 4 or self.relative_max_distance <= self.relative_buckets // 4:
            raise ConfigError(f"T5 relative positions need relative_buckets >= 4 and "
                              f"relative_max_distance > relative_buckets / 4, not "
                              f"{self.relative_buckets} and {self.relative_max_distance}")

    @property
    def inner_dim(self) -> int:
        """Width of attention's q, k, v (n_heads · head_dim), which T5 decouples from d_model."""
        return self.n_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count from the dims alone; the shared embedding once, a tied head not again."""
        d, ff, inner, nh = self.d_model, self.d_ff, self.inner_dim, self.n_heads
        attn = 4 * d * inner  # q, k, v, o
        mlp = 3 * d * ff  # wi_0, wi_1, wo
        encoder = self.n_layers * (2 * d + attn + mlp)
        decoder = self.n_decoder_layers * (3 * d + 2 * attn + mlp)  # self + cross attention
        positions = 2 * self.relative_buckets * nh  # one table per stack
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + encoder + decoder + positions + 2 * d + head


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention, cross-attention to the encoder, MLP; the unit that
    activation checkpointing wraps."""

    def __init__(self, config: T5Config, attn_impl: str) -> None:
        super().__init__()
        d, eps = config.d_model, config.norm_eps
        self.ln_1 = RMSNorm(d, eps)
        self.attn = _self_attention(config, attn_impl, causal=True)
        self.ln_2 = RMSNorm(d, eps)
        self.cross_attn = CrossAttention(d, config.n_heads, attn_impl, config.dropout, bias=False,
                                         head_dim=config.head_dim, scale=1.0)
        self.ln_3 = RMSNorm(d, eps)
        self.mlp = GatedMLP(d, config.d_ff, config.dropout, activation="gelu_tanh",
                           hidden_dropout=True)

    def forward(self, x: Tensor, memory: Tensor, mask: AttnMask | None = None,
                memory_mask: AttnMask | None = None, cache: LayerKV | None = None) -> Tensor:
        # generation's cache: cached self-attention keys, cross-attention keys projected once
        x = x + self.attn(self.ln_1(x), None, mask, cache)  # (B, T, C)
        x = x + self.cross_attn(self.ln_2(x), memory, memory_mask, cache)  # (B, T, C)
        return x + self.mlp(self.ln_3(x))


def _self_attention(config: T5Config, attn_impl: str, causal: bool) -> SelfAttention:
    return SelfAttention(config.d_model, config.n_heads, config.n_heads, attn_impl,
                         config.dropout, bias=False, causal=causal, head_dim=config.head_dim,
                         scale=1.0)


def _encoder_block(config: T5Config, attn_impl: str) -> Block:
    d, eps = config.d_model, config.norm_eps
    attn = _self_attention(config, attn_impl, causal=False)
    return Block(RMSNorm(d, eps), attn, RMSNorm(d, eps),
                 GatedMLP(d, config.d_ff, config.dropout, activation="gelu_tanh",
                           hidden_dropout=True))


class T5Stack(nn.Module):
    """The encoder or the decoder: blocks, the relative position table they share, a final norm."""

    def __init__(self, config: T5Config, attn_impl: str, decoder: bool) -> None:
        super().__init__()
        n = config.n_decoder_layers if decoder else config.n_layers
        make = DecoderBlock if decoder else _encoder_block
        self.blocks = nn.ModuleList(make(config, attn_impl) for _ in range(n))
        self.rel_bias = RelativePositionBias(config.n_heads, config.relative_buckets,
                                             config.relative_max_distance, bidirectional=not decoder)
        self.ln_f = RMSNorm(config.d_model, config.norm_eps)


def _padding(attention_mask: Tensor | None) -> Tensor | None:
    return None if attention_mask is None else attention_mask.bool()


class T5(ModelBase[T5Config]):
    """T5 v1.1: ``forward(input_ids (B, S), decoder_input_ids (B, T)) -> logits (B, T, V)``;
    no loss inside (the trainer takes cross-entropy against labels, -100 ignored)."""

    is_encoder_decoder = True  # generation encodes once, then decodes from decoder_start_id
    attn_bias = True  # relative positions: ``auto`` resolves to FlexAttention on CUDA

    def build(self) -> None:
        c = self.config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)  # HF's "shared"
        self.drop = nn.Dropout(c.dropout)
        self.encoder = T5Stack(c, self.attn_impl, decoder=False)
        self.decoder = T5Stack(c, self.attn_impl, decoder=True)
        self.lm_head = LMHead(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @property
    def blocks(self) -> list[nn.Module]:
        """Encoder then decoder blocks, for ``apply_transforms`` (a plain list: a second registered
        ModuleList would put every block in the state dict twice)."""
        return [*self.encoder.blocks, *self.decoder.blocks]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_weights(self)

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor,
                attention_mask: Tensor | None = None,
                decoder_attention_mask: Tensor | None = None, *, labels: Tensor | None = None,
                loss_chunk: int = 0) -> Tensor:
        """``attention_mask`` (B, S) and ``decoder_attention_mask`` (B, T): 1 for tokens, 0 for
        padding (as in Hugging Face); None when a side has no padding. With ``labels`` (B, T):
        the summed cross-entropy over the labelled tokens instead of the logits (``LMHead``)."""
        memory = self.encode(input_ids, attention_mask)  # (B, S, C)
        return self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask,
                           labels=labels, loss_chunk=loss_chunk)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, S) tokens -> (B, S, C) encoder output (the decoder's memory)."""
        S = input_ids.size(1)
        mask = AttnMask(key_padding=_padding(attention_mask),
                        bias=self.encoder.rel_bias(S, S))  # bias (1, nh, S, S)
        x = self.drop(self.tok_emb(input_ids))  # (B, S, C)
        for block in self.encoder.blocks:
            x = block(x, None, mask)  # (B, S, C)
        return self.drop(self.encoder.ln_f(x))

    def decode(self, decoder_input_ids: Tensor, memory: Tensor,
               attention_mask: Tensor | None = None,
               decoder_attention_mask: Tensor | None = None, *,
               cache: KVCache | None = None, labels: Tensor | None = None,
               loss_chunk: int = 0) -> Tensor:
        """(B, T) decoder tokens attending to ``memory`` (B, S, C) -> logits (B, T, V);
        ``attention_mask`` (B, S) is the encoder input's padding. With a ``cache`` (see
        :meth:`new_cache`) the tokens follow the cached ones (``decoder_attention_mask`` then
        covers both) and the cache advances by T."""
        T = decoder_input_ids.size(1)
        past = 0 if cache is None else cache.length
        mask = AttnMask(key_padding=_padding(decoder_attention_mask),
                        bias=self.decoder.rel_bias(T, past + T, past))  # (1, nh, T, past + T)
        memory_mask = None if attention_mask is None else AttnMask(key_padding=_padding(
            attention_mask))
        x = self.drop(self.tok_emb(decoder_input_ids))  # (B, T, C)
        blocks = self.decoder.blocks
        layers = [None] * len(blocks) if cache is None else cache.layers
        for block, layer in zip(blocks, layers, strict=True):
            x = block(x, memory, mask, memory_mask, layer)  # (B, T, C)
        if cache is not None:
            cache.advance(T)
        x = self.drop(self.decoder.ln_f(x))
        if self.config.tie_embeddings:  # v1.0 rescales before reusing the embedding
            x = x * self.config.d_model ** -0.5
        return self.lm_head(x, labels, loss_chunk)  # (B, T, V), or the loss with labels


    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for the decoder's self-attention (``batch`` rows, up to ``max_len``
        decoder positions) and its cross-attention keys, in the model's dtype and device."""
        c, weight = self.config, self.lm_head.weight
        return KVCache(c.n_decoder_layers, batch, c.n_heads, c.head_dim, max_len, weight.dtype,
                       weight.device)


def init_weights(model: T5) -> None:
    """Hugging Face T5's ``_init_weights`` (factor 1.0): N(0, 1) embeddings and head, q at
    (d·d_kv)^-½ (the 1/√d_kv that attention does not apply), k, v and the MLP inputs at d^-½,
    outputs at fan-in^-½, unit norms. Attention without 1/√d_kv is stable only with this init.
    (T5X draws an untied head at d^-½; HF's N(0, 1) head starts the loss high, ~30, and it falls
    within a few steps.)"""
    c = model.config
    d, inner = c.d_model, c.inner_dim
    nn.init.normal_(model.tok_emb.weight, std=1.0)
    if not c.tie_embeddings:
        nn.init.normal_(model.lm_head.weight, std=1.0)
    for stack in (model.encoder, model.decoder):
        nn.init.normal_(stack.rel_bias.weight, std=d ** -0.5)
        for module in stack.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, GatedMLP):
                nn.init.normal_(module.gate.weight, std=d ** -0.5)
                nn.init.normal_(module.fc.weight, std=d ** -0.5)
                nn.init.normal_(module.proj.weight, std=c.d_ff ** -0.5)
            elif isinstance(module, SelfAttention):
                q, kv = module.qkv.weight.split([inner, 2 * inner])
                nn.init.normal_(q, std=(d * c.head_dim) ** -0.5)
                nn.init.normal_(kv, std=d ** -0.5)
                nn.init.normal_(module.proj.weight, std=inner ** -0.5)
            elif isinstance(module, CrossAttention):
                nn.init.normal_(module.q.weight, std=(d * c.head_dim) ** -0.5)
                nn.init.normal_(module.kv.weight, std=d ** -0.5)
                nn.init.normal_(module.proj.weight, std=inner ** -0.5)


def build_t5(config: T5Config, device: torch.device | str, dtype: torch.dtype) -> T5:
    """The registry's build function."""
    return T5(config, device=device, dtype=dtype)


def span_target_ratio(noise_density: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> float:
    """Decoder tokens per encoder token under span corruption: of n raw tokens, ρn are noise in
    ρn/μ spans; the inputs keep (1 - ρ)n plus a sentinel per span, the targets hold the ρn plus a
    sentinel per span. 0.222 for T5's ρ = 0.15, μ = 3 (114 targets per 512 inputs in the paper)."""
    spans = noise_density / mean_span
    return (noise_density + spans) / (1.0 - noise_density + spans)


def t5_flops_per_token(config: T5Config, seq_len: int,
                       decoder_ratio: float | None = None) -> float:
    """Training FLOPs (forward + backward) per *encoder input* token, the token the trainer counts.

    PaLM's accounting (``palm_flops_per_token``) per stack: 6 per matmul weight per token it
    touches, plus 12·L·inner·(keys attended) for the scores and weighted sums. Encoder weights
    (and the cross-attention's k/v, applied to the encoder output) see every input token; decoder
    weights and the head see ``decoder_ratio`` (T = ratio · S) decoder tokens per input token. The
    default ratio assumes span corruption (``span_target_ratio``). The embedding is a lookup
    (not counted), the relative biases and norms are negligible.
    """
    c = config
    r = span_target_ratio() if decoder_ratio is None else decoder_ratio
    d, inner, S = c.d_model, c.inner_dim, seq_len
    mlp, attn = 3 * d * c.d_ff, 4 * d * inner
    encoder = c.n_layers * (attn + mlp) + c.n_decoder_layers * 2 * d * inner  # + cross k, v
    decoder = c.n_decoder_layers * (attn + 2 * d * inner + mlp) + c.vocab_size * d  # + cross q, o
    matmuls = 6.0 * (encoder + r * decoder)
    scores = 12.0 * inner * (c.n_layers * S + r * c.n_decoder_layers * (r * S + S))
    return matmuls + scores

