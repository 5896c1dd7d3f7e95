"""megatrain Llama <-> Hugging Face ``LlamaForCausalLM``.

Names map one to one except that megatrain fuses q, k and v into one projection (split here by
shape: q has ``d_model`` rows, k and v the rest in halves). Both sides use the "rotate half" RoPE
layout, so no q/k permutation is needed. With tied embeddings ``lm_head.weight`` is the token
embedding, the same tensor (drop it before saving with safetensors; a missing one is read back as
the embedding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from megatrain.models.common.hf import Fields, HFAdapter, StateDict, fields_from_hf, fields_to_hf
from megatrain.models.common.keymap import KeyMap, fused, rename, under
from megatrain.models.llama.model import LlamaConfig

if TYPE_CHECKING:
    from transformers import LlamaConfig as HFLlamaConfig

# megatrain LlamaConfig field -> HF LlamaConfig attribute, the same value both ways
_FIELDS: Fields = (
    ("vocab_size", "vocab_size"), ("d_model", "hidden_size"), ("d_ff", "intermediate_size"),
    ("n_layers", "num_hidden_layers"), ("n_heads", "num_attention_heads"),
    ("max_seq_len", "max_position_embeddings"), ("norm_eps", "rms_norm_eps"),
    ("tie_embeddings", "tie_word_embeddings"),
    ("dropout", "attention_dropout"),  # HF Llama has no residual dropout; training-only anyway
)


def llama_config_to_hf(config: LlamaConfig) -> HFLlamaConfig:
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(
        **fields_to_hf(_FIELDS, config),
        num_key_value_heads=config.n_kv_heads,
        rope_theta=config.rope_theta,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
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
        **fields_from_hf(_FIELDS, hf_config),
        n_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        rope_theta=_rope_theta(hf_config),
    )


def _split_qkv(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of the fused projection: q has d_model rows (it projects d_model -> d_model), k
    and v half the rest each (grouped-query attention makes them smaller)."""
    q_rows = qkv.size(1)
    kv_rows = (qkv.size(0) - q_rows) // 2
    q, k, v = (part.contiguous() for part in qkv.split([q_rows, kv_rows, kv_rows]))
    return q, k, v


def _tied_head(out: StateDict) -> Tensor:
    """A missing ``lm_head.weight`` is the token embedding (tied; safetensors stores it once)."""
    return out["tok_emb.weight"]


KEYS = KeyMap(
    "Llama",
    rules=(
        rename("tok_emb.weight", "model.embed_tokens.weight"),
        rename("ln_f.weight", "model.norm.weight"),
        rename("lm_head.weight", "lm_head.weight", fallback=_tied_head),
        *under("blocks.*.", "model.layers.*.", (
            rename("ln_1.weight", "input_layernorm.weight"),
            fused("attn.qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                      "self_attn.v_proj.weight"), split=_split_qkv),
            rename("attn.proj.weight", "self_attn.o_proj.weight"),
            rename("ln_2.weight", "post_attention_layernorm.weight"),
            rename("mlp.gate.weight", "mlp.gate_proj.weight"),
            rename("mlp.fc.weight", "mlp.up_proj.weight"),
            rename("mlp.proj.weight", "mlp.down_proj.weight"),
        )),
    ),
    # RoPE buffers of older transformers
    hf_ignored=("model.layers.*.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq"),
)
state_dict_to_hf = KEYS.to_hf
state_dict_from_hf = KEYS.from_hf

LLAMA_ADAPTER = HFAdapter(model_type="llama", architecture="LlamaForCausalLM",
                          config_to_hf=llama_config_to_hf, config_from_hf=llama_config_from_hf,
                          state_dict_to_hf=state_dict_to_hf, state_dict_from_hf=state_dict_from_hf)
