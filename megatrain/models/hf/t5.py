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

import re
from typing import TYPE_CHECKING, Any

import torch

from megatrain.errors import ConfigError
from megatrain.models.hf import HFAdapter, StateDict
from megatrain.models.t5.model import T5Config

if TYPE_CHECKING:
    from transformers import T5Config as HFT5Config

_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_TOP = {
    "lm_head.weight": "lm_head.weight",
    "encoder.ln_f.weight": "encoder.final_layer_norm.weight",
    "decoder.ln_f.weight": "decoder.final_layer_norm.weight",
    "encoder.rel_bias.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "decoder.rel_bias.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
}
# megatrain name inside a block -> HF name inside ``<stack>.block.<i>.``, per stack
_MLP = {"mlp.gate.weight": "DenseReluDense.wi_0.weight", "mlp.fc.weight": "DenseReluDense.wi_1.weight",
        "mlp.proj.weight": "DenseReluDense.wo.weight"}
_ENCODER = {
    "ln_1.weight": "layer.0.layer_norm.weight",
    "attn.proj.weight": "layer.0.SelfAttention.o.weight",
    "ln_2.weight": "layer.1.layer_norm.weight",
    **{k: f"layer.1.{v}" for k, v in _MLP.items()},
}
_DECODER = {
    "ln_1.weight": "layer.0.layer_norm.weight",
    "attn.proj.weight": "layer.0.SelfAttention.o.weight",
    "ln_2.weight": "layer.1.layer_norm.weight",
    "cross_attn.q.weight": "layer.1.EncDecAttention.q.weight",
    "cross_attn.proj.weight": "layer.1.EncDecAttention.o.weight",
    "ln_3.weight": "layer.2.layer_norm.weight",
    **{k: f"layer.2.{v}" for k, v in _MLP.items()},
}
# fused megatrain weight -> the HF weights it concatenates (row blocks of equal size)
_FUSED = {
    "attn.qkv.weight": ("layer.0.SelfAttention.q.weight", "layer.0.SelfAttention.k.weight",
                        "layer.0.SelfAttention.v.weight"),
    "cross_attn.kv.weight": ("layer.1.EncDecAttention.k.weight",
                             "layer.1.EncDecAttention.v.weight"),
}
_STACK_NAMES = {"encoder": _ENCODER, "decoder": _DECODER}
_MT_BLOCK = re.compile(r"(encoder|decoder)\.blocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"(encoder|decoder)\.block\.(\d+)\.(.+)")
# A table HF creates in the decoder's first cross-attention but never uses.
_UNUSED = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def t5_config_to_hf(config: T5Config) -> HFT5Config:
    from transformers import T5Config as HFT5Config

    return HFT5Config(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_kv=config.head_dim,
        d_ff=config.d_ff,
        num_layers=config.n_layers,
        num_decoder_layers=config.n_decoder_layers,
        num_heads=config.n_heads,
        relative_attention_num_buckets=config.relative_buckets,
        relative_attention_max_distance=config.relative_max_distance,
        dropout_rate=config.dropout,
        layer_norm_epsilon=config.norm_eps,
        initializer_factor=1.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=config.tie_embeddings,
        is_encoder_decoder=True,
        decoder_start_token_id=config.decoder_start_id,
        pad_token_id=config.decoder_start_id,  # T5 starts decoding from pad
        bos_token_id=None,
        eos_token_id=None,
        n_positions=config.max_seq_len,  # informational: HF T5 has no position limit
        architectures=["T5ForConditionalGeneration"],
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
        n_layers=hf_config.num_layers,
        n_decoder_layers=hf_config.num_decoder_layers,
        d_model=hf_config.d_model,
        n_heads=hf_config.num_heads,
        head_dim=hf_config.d_kv,
        d_ff=hf_config.d_ff,
        vocab_size=hf_config.vocab_size,
        max_seq_len=getattr(hf_config, "n_positions", None) or 512,
        relative_buckets=hf_config.relative_attention_num_buckets,
        relative_max_distance=hf_config.relative_attention_max_distance,
        norm_eps=hf_config.layer_norm_epsilon,
        tie_embeddings=_tied(hf_config),
        decoder_start_id=start,
        dropout=float(hf_config.dropout_rate),
    )


def state_dict_to_hf(sd: StateDict) -> StateDict:
    """megatrain T5 state dict -> T5ForConditionalGeneration state dict; the three embedding
    names hold the same tensor (store it once with safetensors)."""
    out: StateDict = {name: sd["tok_emb.weight"] for name in _EMBEDDINGS}
    for name, tensor in sd.items():
        m = _MT_BLOCK.fullmatch(name)
        if m is None:
            if name != "tok_emb.weight":
                out[_TOP[name]] = tensor
            continue
        stack, index, local = m.groups()
        prefix = f"{stack}.block.{index}."
        if local in _FUSED:
            parts = _FUSED[local]
            for hf_name, part in zip(parts, tensor.chunk(len(parts))):
                out[prefix + hf_name] = part.contiguous()
        else:
            out[prefix + _STACK_NAMES[stack][local]] = tensor
    return out


def state_dict_from_hf(sd: StateDict) -> StateDict:
    """T5ForConditionalGeneration state dict -> megatrain T5 state dict. A missing
    ``lm_head.weight`` is the embedding (a tied model; or a transformers 5 model whose head was
    never untied, which then computes as an untied head holding a copy)."""
    top = {hf: mt for mt, hf in _TOP.items()}
    names = {stack: {hf: mt for mt, hf in local.items()} for stack, local in _STACK_NAMES.items()}
    fused_parts = {hf: mt for mt, parts in _FUSED.items() for hf in parts}
    out: StateDict = {}
    fused: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in sd.items():
        m = _HF_BLOCK.fullmatch(name)
        if name == _UNUSED:
            continue
        if name in _EMBEDDINGS:
            out.setdefault("tok_emb.weight", tensor)
        elif name in top or m is None:
            out[top[name]] = tensor
        elif m.group(3) in fused_parts:
            stack, index, local = m.groups()
            fused.setdefault((stack, index, fused_parts[local]), {})[local] = tensor
        else:
            stack, index, local = m.groups()
            out[f"{stack}.blocks.{index}.{names[stack][local]}"] = tensor
    for (stack, index, mt_name), parts in fused.items():
        out[f"{stack}.blocks.{index}.{mt_name}"] = torch.cat([parts[p] for p in _FUSED[mt_name]])
    if "lm_head.weight" not in out:  # tied, or a transformers-5 head that was never untied
        out["lm_head.weight"] = out["tok_emb.weight"].clone()
    return out


T5_ADAPTER = HFAdapter(
    model_type="t5",
    architecture="T5ForConditionalGeneration",
    config_to_hf=t5_config_to_hf,
    config_from_hf=t5_config_from_hf,
    state_dict_to_hf=state_dict_to_hf,
    state_dict_from_hf=state_dict_from_hf,
)
