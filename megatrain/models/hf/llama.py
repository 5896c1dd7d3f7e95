"""megatrain Llama <-> Hugging Face ``LlamaForCausalLM``.

Names map one to one except that megatrain fuses q, k and v into one projection (split here by
shape: q has ``d_model`` rows, k and v the rest in halves). Both sides use the "rotate half" RoPE
layout, so no q/k permutation is needed.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from megatrain.models.gpt.llama import LlamaConfig
from megatrain.models.hf import HFAdapter, StateDict

if TYPE_CHECKING:
    from transformers import LlamaConfig as HFLlamaConfig

# megatrain name -> HF name, outside blocks and inside blocks (under "model.layers.<i>.")
_TOP = {"tok_emb.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}
_BLOCK = {
    "ln_1.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.fc.weight": "mlp.up_proj.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
}
_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_MT_LAYER = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def llama_config_to_hf(config: LlamaConfig) -> HFLlamaConfig:
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=config.dropout,  # HF Llama has no residual dropout; training-only anyway
        bos_token_id=None,
        eos_token_id=None,
        architectures=["LlamaForCausalLM"],
    )


def _rope_theta(hf_config: HFLlamaConfig) -> float:
    """transformers 5 keeps θ in ``rope_parameters``, 4.x in ``rope_theta`` (+ ``rope_scaling``)."""
    params = getattr(hf_config, "rope_parameters", None) or hf_config.rope_scaling or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"HF Llama rope_type={rope_type} (RoPE scaling) is not supported")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def llama_config_from_hf(hf_config: HFLlamaConfig) -> LlamaConfig:
    """A LlamaConfig for a HF Llama; rejects the variants megatrain's Llama does not model."""
    if hf_config.hidden_act != "silu" or hf_config.attention_bias or hf_config.mlp_bias:
        raise ValueError("HF Llama with a non-SiLU activation or biases is not supported")
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim not in (None, hf_config.hidden_size // hf_config.num_attention_heads):
        raise ValueError(f"HF Llama head_dim={head_dim} != hidden_size / num_attention_heads")
    return LlamaConfig(
        n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        d_ff=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=_rope_theta(hf_config),
        norm_eps=hf_config.rms_norm_eps,
        tie_embeddings=hf_config.tie_word_embeddings,
        dropout=hf_config.attention_dropout,
    )


def state_dict_to_hf(sd: StateDict) -> StateDict:
    """megatrain Llama state dict -> LlamaForCausalLM state dict. With tied embeddings
    ``lm_head.weight`` is the token embedding, the same tensor: drop it before safetensors."""
    out: StateDict = {}
    for name, tensor in sd.items():
        m = _MT_LAYER.fullmatch(name)
        if m is None:
            out[_TOP[name]] = tensor
            continue
        index, local = m.groups()
        prefix = f"model.layers.{index}."
        if local == "attn.qkv.weight":
            q_rows = tensor.size(1)  # q projects d_model -> d_model
            kv_rows = (tensor.size(0) - q_rows) // 2
            for hf_name, part in zip(_QKV, tensor.split([q_rows, kv_rows, kv_rows])):
                out[prefix + hf_name] = part.contiguous()
        else:
            out[prefix + _BLOCK[local]] = tensor
    return out


def state_dict_from_hf(sd: StateDict) -> StateDict:
    """LlamaForCausalLM state dict -> megatrain Llama state dict; a missing ``lm_head.weight``
    (tied, as safetensors files store it) is the token embedding."""
    top = {hf: mt for mt, hf in _TOP.items()}
    block = {hf: mt for mt, hf in _BLOCK.items()}
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # layer index -> q/k/v projections
    for name, tensor in sd.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer of older transformers
        m = _HF_LAYER.fullmatch(name)
        if m is None:
            out[top[name]] = tensor
        elif m.group(2) in _QKV:
            qkv.setdefault(m.group(1), {})[m.group(2)] = tensor
        else:
            out[f"blocks.{m.group(1)}.{block[m.group(2)]}"] = tensor
    for index, parts in qkv.items():
        out[f"blocks.{index}.attn.qkv.weight"] = torch.cat([parts[n] for n in _QKV])
    out.setdefault("lm_head.weight", out["tok_emb.weight"])
    return out


LLAMA_ADAPTER = HFAdapter(
    model_type="llama",
    architecture="LlamaForCausalLM",
    config_to_hf=llama_config_to_hf,
    config_from_hf=llama_config_from_hf,
    state_dict_to_hf=state_dict_to_hf,
    state_dict_from_hf=state_dict_from_hf,
)
