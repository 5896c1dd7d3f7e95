"""megatrain T5 <-> Hugging Face ``T5ForConditionalGeneration`` (v1.1, ``gated-gelu``).

Names differ more than for GPT: HF nests each block's sublayers as ``layer.0`` (self-attention),
``layer.1`` (cross-attention, decoder only) and the last ``layer`` (MLP), keeps the relative
position table in block 0's self-attention, and has separate q/k/v (megatrain fuses q, k, v in
self-attention and k, v in cross-attention; split here by rows: q, k and v have n_heads · d_kv
rows each). The input embedding is one tensor under three HF names (``shared`` and both stacks'
``embed_tokens``).

transformers 5 always ties ``lm_head`` to ``shared`` when it builds a T5, and unties on
``from_pretrained`` when the checkpoint holds a different ``lm_head.weight``; it records v1.1's
``tie_word_embeddings=False`` as ``scale_decoder_outputs=False``. Both versions are read here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from megatrain.errors import ConfigError
from megatrain.models.common.hf import Fields, HFAdapter, StateDict, fields_from_hf, fields_to_hf
from megatrain.models.common.keymap import KeyMap, Rule, aliased, fused, rename, under
from megatrain.models.t5.model import T5Config

if TYPE_CHECKING:
    from transformers import T5Config as HFT5Config

# megatrain T5Config field -> HF T5Config attribute, the same value both ways
_FIELDS: Fields = (
    ("vocab_size", "vocab_size"), ("d_model", "d_model"), ("head_dim", "d_kv"), ("d_ff", "d_ff"),
    ("n_layers", "num_layers"), ("n_decoder_layers", "num_decoder_layers"),
    ("n_heads", "num_heads"), ("relative_buckets", "relative_attention_num_buckets"),
    ("relative_max_distance", "relative_attention_max_distance"),
    ("norm_eps", "layer_norm_epsilon"),
)
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def t5_config_to_hf(config: T5Config) -> HFT5Config:
    from transformers import T5Config as HFT5Config

    return HFT5Config(
        **fields_to_hf(_FIELDS, config),
        dropout_rate=config.dropout,
        initializer_factor=1.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=config.tie_embeddings,
        is_encoder_decoder=True,
        decoder_start_token_id=config.decoder_start_id,
        pad_token_id=config.decoder_start_id,  # T5 starts decoding from pad
        bos_token_id=None,
        eos_token_id=None,
        n_positions=config.max_seq_len,  # informational: HF T5 has no position limit
    )


def _tied(hf_config: Any) -> bool:
    """Whether the head is the embedding, the decoder output scaled by 1/√d first (as in T5
    v1.0; v1.1 unties): transformers 5 says so in
    ``scale_decoder_outputs`` (its ``tie_word_embeddings`` is always True), 4.x in
    ``tie_word_embeddings``."""
    return bool(getattr(hf_config, "scale_decoder_outputs", hf_config.tie_word_embeddings))


def _check_supported(hf_config: Any) -> None:
    """ConfigError for the T5 variants megatrain's T5 does not model."""
    proj = hf_config.feed_forward_proj
    if not getattr(hf_config, "is_gated_act", proj.startswith("gated-")) or \
            getattr(hf_config, "dense_act_fn", "gelu_new") not in _TANH_GELU:
        raise ConfigError(f"HF T5 with feed_forward_proj={proj} is not supported: megatrain "
                          "models T5 v1.1 (gated-gelu); the original T5 (relu) is not")
    if not getattr(hf_config, "is_encoder_decoder", True):
        raise ConfigError("HF T5 config is not an encoder-decoder")


def t5_config_from_hf(hf_config: HFT5Config) -> T5Config:
    """A T5Config for a HF T5 v1.1 (or a gated-GELU T5 with a tied, rescaled head);
    ConfigError for the variants megatrain's T5 does not model (the original relu T5)."""
    _check_supported(hf_config)
    start = hf_config.decoder_start_token_id
    start = hf_config.pad_token_id if start is None else start
    if start is None:
        raise ConfigError("HF T5 config has neither decoder_start_token_id nor pad_token_id")
    return T5Config(
        **fields_from_hf(_FIELDS, hf_config),
        max_seq_len=getattr(hf_config, "n_positions", None) or 512,
        tie_embeddings=_tied(hf_config),
        decoder_start_id=start,
        dropout=float(hf_config.dropout_rate),
    )


def _block(decoder: bool) -> tuple[Rule, ...]:
    """A block's rules. HF's ``layer.0`` is self-attention, ``layer.1`` cross-attention (decoder
    only), the last ``layer`` the gated MLP, each with its RMSNorm first; megatrain's fused
    projections are HF's q, k, v in equal row blocks (n_heads · d_kv rows each)."""
    self_attn, cross_attn = "layer.0.SelfAttention", "layer.1.EncDecAttention"
    mlp, mlp_norm = ("layer.2", "ln_3") if decoder else ("layer.1", "ln_2")
    attention = (rename("ln_1.weight", "layer.0.layer_norm.weight"),
                 fused("attn.qkv.weight", tuple(f"{self_attn}.{p}.weight" for p in "qkv")),
                 rename("attn.proj.weight", f"{self_attn}.o.weight"))
    cross = (rename("ln_2.weight", "layer.1.layer_norm.weight"),
             rename("cross_attn.q.weight", f"{cross_attn}.q.weight"),
             fused("cross_attn.kv.weight", tuple(f"{cross_attn}.{p}.weight" for p in "kv")),
             rename("cross_attn.proj.weight", f"{cross_attn}.o.weight"))
    feed_forward = (rename(f"{mlp_norm}.weight", f"{mlp}.layer_norm.weight"),
                    rename("mlp.gate.weight", f"{mlp}.DenseReluDense.wi_0.weight"),
                    rename("mlp.fc.weight", f"{mlp}.DenseReluDense.wi_1.weight"),
                    rename("mlp.proj.weight", f"{mlp}.DenseReluDense.wo.weight"))
    return (*attention, *(cross if decoder else ()), *feed_forward)


def _relative_bias(stack: str) -> Rule:
    """A stack's relative-position table: HF keeps it in block 0's self-attention only."""
    return rename(f"{stack}.rel_bias.weight",
                  f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")


def _stack(stack: str) -> tuple[Rule, ...]:
    """The rules of ``encoder`` or ``decoder``: its blocks (``blocks`` vs HF's ``block``)."""
    return (_relative_bias(stack),
            rename(f"{stack}.ln_f.weight", f"{stack}.final_layer_norm.weight"),
            *under(f"{stack}.blocks.*.", f"{stack}.block.*.", _block(stack == "decoder")))


def _head_copy(out: StateDict) -> Tensor:
    """A missing ``lm_head.weight`` is the embedding (a tied model; or a transformers 5 model
    whose head was never untied, which then computes as an untied head holding a copy)."""
    return out["tok_emb.weight"].clone()


KEYS = KeyMap(
    "T5",
    rules=(
        aliased("tok_emb.weight",
                "shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
        rename("lm_head.weight", "lm_head.weight", fallback=_head_copy),
        *_stack("encoder"),
        *_stack("decoder"),
    ),
    # a table HF creates in the decoder's first cross-attention but never uses
    hf_ignored=("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",),
)
state_dict_to_hf = KEYS.to_hf
state_dict_from_hf = KEYS.from_hf

T5_ADAPTER = HFAdapter(model_type="t5", architecture="T5ForConditionalGeneration",
                       config_to_hf=t5_config_to_hf, config_from_hf=t5_config_from_hf,
                       state_dict_to_hf=state_dict_to_hf, state_dict_from_hf=state_dict_from_hf)
