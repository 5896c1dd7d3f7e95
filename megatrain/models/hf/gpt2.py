"""megatrain GPT <-> Hugging Face ``GPT2LMHeadModel``.

The layouts match name for name except for a ``transformer.`` prefix and HF's ``Conv1D``, which
stores linear weights as (in, out): those four weights per block are transposed.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from megatrain.models.gpt.model import GPTConfig
from megatrain.models.hf import HFAdapter, StateDict

if TYPE_CHECKING:
    from transformers import GPT2Config

# megatrain module name -> HF module name (under "transformer."), outside and inside blocks
_TOP = {"tok_emb": "wte", "pos_emb": "wpe", "ln_f": "ln_f"}
_BLOCK = {
    "ln_1": "ln_1",
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "ln_2": "ln_2",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}
_CONV1D = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}  # HF stores these as (in, out)
_PARAM = re.compile(r"(?:(blocks|h)\.(\d+)\.)?(.+)\.(weight|bias)")


def gpt2_config_to_hf(config: GPTConfig) -> GPT2Config:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_seq_len,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=config.d_ff,
        activation_function="gelu_new",  # tanh approximation, as megatrain's GPT
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        architectures=["GPT2LMHeadModel"],
    )


def gpt2_config_from_hf(hf_config: GPT2Config) -> GPTConfig:
    """A GPTConfig for a HF GPT-2; rejects the GPT-2 variants megatrain's GPT does not model."""
    if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"HF GPT-2 activation {hf_config.activation_function} is not tanh-GELU")
    if hf_config.scale_attn_by_inverse_layer_idx or hf_config.reorder_and_upcast_attn:
        raise ValueError("HF GPT-2 with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                         "is not supported")
    return GPTConfig(
        n_layers=hf_config.n_layer,
        d_model=hf_config.n_embd,
        n_heads=hf_config.n_head,
        d_ff=hf_config.n_inner or 4 * hf_config.n_embd,
        vocab_size=hf_config.vocab_size,
        max_seq_len=hf_config.n_positions,
        dropout=hf_config.resid_pdrop,
    )


def _parse(name: str) -> tuple[str | None, str, str]:
    """'blocks.3.attn.qkv.weight' -> ('3', 'attn.qkv', 'weight'); outside blocks index is None."""
    m = _PARAM.fullmatch(name)
    if m is None:
        raise KeyError(f"not a GPT parameter name: {name!r}")
    _, index, module, param = m.groups()
    return index, module, param


def state_dict_to_hf(sd: StateDict) -> StateDict:
    """megatrain GPT state dict -> GPT2LMHeadModel state dict. ``lm_head.weight`` is the tied
    token embedding, the same tensor: drop or clone it before saving with safetensors."""
    out: StateDict = {}
    for name, tensor in sd.items():
        if name == "lm_head.weight":
            continue
        index, module, param = _parse(name)
        if index is None:
            out[f"transformer.{_TOP[module]}.{param}"] = tensor
            continue
        hf_module = _BLOCK[module]
        transpose = hf_module in _CONV1D and param == "weight"
        hf_name = f"transformer.h.{index}.{hf_module}.{param}"
        out[hf_name] = tensor.t().contiguous() if transpose else tensor
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def state_dict_from_hf(sd: StateDict) -> StateDict:
    """GPT2LMHeadModel (or GPT2Model) state dict -> megatrain GPT state dict."""
    top = {hf: mt for mt, hf in _TOP.items()}
    block = {hf: mt for mt, hf in _BLOCK.items()}
    out: StateDict = {}
    for name, tensor in sd.items():
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # tied to wte; causal-mask buffers of older transformers
        index, module, param = _parse(name)
        if index is None:
            out[f"{top[module]}.{param}"] = tensor
            continue
        transpose = module in _CONV1D and param == "weight"
        mt_name = f"blocks.{index}.{block[module]}.{param}"
        out[mt_name] = tensor.t().contiguous() if transpose else tensor
    out["lm_head.weight"] = out["tok_emb.weight"]
    return out


GPT2_ADAPTER = HFAdapter(
    model_type="gpt2",
    architecture="GPT2LMHeadModel",
    config_to_hf=gpt2_config_to_hf,
    config_from_hf=gpt2_config_from_hf,
    state_dict_to_hf=state_dict_to_hf,
    state_dict_from_hf=state_dict_from_hf,
)
