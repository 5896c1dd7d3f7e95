"""megatrain GPT <-> Hugging Face ``GPT2LMHeadModel``.

The layouts match name for name except for a ``transformer.`` prefix and HF's ``Conv1D``, which
stores linear weights as (in, out): those four weights per block are transposed. ``lm_head`` is
the token embedding on both sides (``state_dict_to_hf`` gives the same tensor twice: drop or clone
one before saving with safetensors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatrain.models.common.hf import Fields, HFAdapter, fields_from_hf, fields_to_hf
from megatrain.models.common.keymap import KeyMap, Rule, params, rename, tied, transposed, under
from megatrain.models.gpt2.model import GPTConfig

if TYPE_CHECKING:
    from transformers import GPT2Config

# megatrain GPTConfig field -> GPT2Config attribute, the same value both ways
_FIELDS: Fields = (("vocab_size", "vocab_size"), ("max_seq_len", "n_positions"),
                   ("d_model", "n_embd"), ("n_layers", "n_layer"), ("n_heads", "n_head"),
                   ("dropout", "resid_pdrop"))


def gpt2_config_to_hf(config: GPTConfig) -> GPT2Config:
    from transformers import GPT2Config

    return GPT2Config(
        **fields_to_hf(_FIELDS, config),
        n_inner=config.d_ff,
        activation_function="gelu_new",  # tanh approximation, as megatrain's GPT
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )


def gpt2_config_from_hf(hf_config: GPT2Config) -> GPTConfig:
    """A GPTConfig for a HF GPT-2; rejects the GPT-2 variants megatrain's GPT does not model."""
    if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"HF GPT-2 activation {hf_config.activation_function} is not tanh-GELU")
    if hf_config.scale_attn_by_inverse_layer_idx or hf_config.reorder_and_upcast_attn:
        raise ValueError("HF GPT-2 with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                         "is not supported")
    return GPTConfig(**fields_from_hf(_FIELDS, hf_config),
                     d_ff=hf_config.n_inner or 4 * hf_config.n_embd)


def _conv1d(mt_module: str, hf_module: str) -> tuple[Rule, Rule]:
    """A linear layer HF keeps in a ``Conv1D``: the weight transposed, the bias as is."""
    return (transposed(f"{mt_module}.weight", f"{hf_module}.weight"),
            rename(f"{mt_module}.bias", f"{hf_module}.bias"))


def _transformer_prefixed(name: str) -> str:
    """A GPT2Model state dict (and the original GPT-2 files) lacks GPT2LMHeadModel's
    ``transformer.`` prefix."""
    if name.startswith("transformer.") or name == "lm_head.weight":
        return name
    return f"transformer.{name}"


KEYS = KeyMap(
    "GPT-2",
    rules=(
        rename("tok_emb.weight", "transformer.wte.weight"),
        rename("pos_emb.weight", "transformer.wpe.weight"),
        *params("ln_f", "transformer.ln_f"),
        tied("lm_head.weight", "lm_head.weight", source="tok_emb.weight"),
        *under("blocks.*.", "transformer.h.*.", (
            *params("ln_1", "ln_1"),
            *_conv1d("attn.qkv", "attn.c_attn"),
            *_conv1d("attn.proj", "attn.c_proj"),
            *params("ln_2", "ln_2"),
            *_conv1d("mlp.fc", "mlp.c_fc"),
            *_conv1d("mlp.proj", "mlp.c_proj"),
        )),
    ),
    # causal-mask buffers of older transformers
    hf_ignored=("transformer.h.*.attn.bias", "transformer.h.*.attn.masked_bias"),
    hf_spelling=_transformer_prefixed,
)
state_dict_to_hf = KEYS.to_hf
state_dict_from_hf = KEYS.from_hf

GPT2_ADAPTER = HFAdapter(model_type="gpt2", architecture="GPT2LMHeadModel",
                         config_to_hf=gpt2_config_to_hf, config_from_hf=gpt2_config_from_hf,
                         state_dict_to_hf=state_dict_to_hf, state_dict_from_hf=state_dict_from_hf)
