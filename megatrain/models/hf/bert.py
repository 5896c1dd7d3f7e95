"""megatrain BERT <-> Hugging Face ``BertForMaskedLM``.

Names map one to one except that megatrain fuses query, key and value into one projection (split
here into three equal parts, weights and biases alike). Both sides tie the MLM decoder's weight to
the word embeddings; HF also aliases the decoder's bias as ``cls.predictions.bias``. Only the
post-LN model has a BertForMaskedLM layout: a pre-LN one is refused with the reason.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from megatrain.errors import ConfigError
from megatrain.models.bert.model import BertConfig
from megatrain.models.hf import HFAdapter, StateDict

if TYPE_CHECKING:
    from transformers import BertConfig as HFBertConfig

# megatrain module name -> HF module name, outside blocks and inside blocks (under
# "bert.encoder.layer.<i>."); parameters keep their weight / bias suffix.
_TOP = {
    "tok_emb": "bert.embeddings.word_embeddings",
    "pos_emb": "bert.embeddings.position_embeddings",
    "type_emb": "bert.embeddings.token_type_embeddings",
    "emb_ln": "bert.embeddings.LayerNorm",
    "head.dense": "cls.predictions.transform.dense",
    "head.ln": "cls.predictions.transform.LayerNorm",
}
_BLOCK = {
    "attn.proj": "attention.output.dense",
    "ln_1": "attention.output.LayerNorm",
    "mlp.fc": "intermediate.dense",
    "mlp.proj": "output.dense",
    "ln_2": "output.LayerNorm",
}
_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")
_DECODER_WEIGHT = "cls.predictions.decoder.weight"  # the word embeddings (tied)
_DECODER_BIAS = "cls.predictions.decoder.bias"  # an alias of _MLM_BIAS
_MLM_BIAS = "cls.predictions.bias"
# Parts of other BERT heads (BertForPreTraining's pooler and NSP head) and old buffers: not used.
_UNUSED = ("bert.pooler.", "cls.seq_relationship.", "bert.embeddings.position_ids")
_MT_LAYER = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")
_HF_LAYER = re.compile(r"bert\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")

_PRE_LN_REFUSAL = (
    "model.norm_position=pre cannot be exported to BertForMaskedLM: Hugging Face's BERT is "
    "post-LayerNorm only (each block normalises after its residual sum, the embeddings are "
    "normalised and there is no final LayerNorm), so a pre-LN model would compute different "
    "outputs there; train with model.norm_position=post to export")


def bert_config_to_hf(config: BertConfig) -> HFBertConfig:
    """The BertForMaskedLM config of a post-LN megatrain BERT; a pre-LN one is a ConfigError."""
    from transformers import BertConfig as HFBertConfig

    if config.norm_position != "post":
        raise ConfigError(_PRE_LN_REFUSAL)
    return HFBertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        intermediate_size=config.d_ff,
        hidden_act="gelu",  # exact (erf) GELU, as megatrain's BERT
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        max_position_embeddings=config.max_seq_len,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.norm_eps,
        pad_token_id=None,  # the export sets the tokenizer's
        tie_word_embeddings=True,
        is_decoder=False,
        architectures=["BertForMaskedLM"],
    )


def bert_config_from_hf(hf_config: HFBertConfig) -> BertConfig:
    """A BertConfig for a HF BERT; rejects the variants megatrain's BERT does not model."""
    if hf_config.hidden_act != "gelu":
        raise ValueError(f"HF BERT activation {hf_config.hidden_act} is not exact GELU")
    position_type = getattr(hf_config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"HF BERT position_embedding_type={position_type} is not supported")
    if hf_config.is_decoder or hf_config.add_cross_attention:
        raise ValueError("HF BERT as a decoder (is_decoder / add_cross_attention) is not "
                         "supported: megatrain's BERT is a bidirectional encoder")
    if not hf_config.tie_word_embeddings:
        raise ValueError("HF BERT with an MLM decoder untied from the word embeddings is not "
                         "supported")
    return BertConfig(
        n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size,
        n_heads=hf_config.num_attention_heads,
        d_ff=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        max_seq_len=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size,
        norm_eps=hf_config.layer_norm_eps,
        dropout=hf_config.hidden_dropout_prob,
    )


def _block_to_hf(index: str, module: str, param: str, tensor: torch.Tensor) -> StateDict:
    prefix = f"bert.encoder.layer.{index}."
    if module == "attn.qkv":  # (3·C, C) or (3·C,) -> query, key, value
        return {f"{prefix}{hf}.{param}": part.contiguous()
                for hf, part in zip(_QKV, tensor.chunk(3))}
    return {f"{prefix}{_BLOCK[module]}.{param}": tensor}


def state_dict_to_hf(sd: StateDict) -> StateDict:
    """megatrain BERT state dict -> BertForMaskedLM state dict. The decoder's weight is the word
    embedding and its bias ``cls.predictions.bias``, the same tensors: drop the later names
    before saving with safetensors (transformers re-ties them on load)."""
    if any(name.startswith("ln_f.") for name in sd):
        raise ConfigError(_PRE_LN_REFUSAL)
    out: StateDict = {}
    for name, tensor in sd.items():
        m = _MT_LAYER.fullmatch(name)
        if m is not None:
            out.update(_block_to_hf(*m.groups(), tensor))
        elif name == "head.decoder.weight":
            out[_DECODER_WEIGHT] = tensor
        elif name == "head.decoder.bias":
            out[_MLM_BIAS] = out[_DECODER_BIAS] = tensor
        else:
            module, param = name.rsplit(".", 1)
            out[f"{_TOP[module]}.{param}"] = tensor
    return out


def _current_name(name: str) -> str:
    """Checkpoints from the TensorFlow port name LayerNorm parameters gamma / beta."""
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                      "LayerNorm.bias")


def state_dict_from_hf(sd: StateDict) -> StateDict:
    """BertForMaskedLM (or BertForPreTraining: its pooler and NSP head are left out) state dict
    -> megatrain BERT state dict."""
    top = {hf: mt for mt, hf in _TOP.items()}
    block = {hf: mt for mt, hf in _BLOCK.items()}
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer, param) -> q/k/v parts
    for raw_name, tensor in sd.items():
        name = _current_name(raw_name)
        if name.startswith(_UNUSED) or name == _DECODER_WEIGHT:
            continue  # the decoder's weight is the word embedding
        if name in (_MLM_BIAS, _DECODER_BIAS):
            out.setdefault("head.decoder.bias", tensor)  # two names of one tensor
            continue
        m = _HF_LAYER.fullmatch(name)
        if m is None:
            module, param = name.rsplit(".", 1)
            if module not in top:
                raise KeyError(f"not a BertForMaskedLM parameter name: {raw_name!r}")
            out[f"{top[module]}.{param}"] = tensor
        elif m.group(2) in _QKV:
            index, module, param = m.groups()
            qkv.setdefault((index, param), {})[module] = tensor
        else:
            index, module, param = m.groups()
            out[f"blocks.{index}.{block[module]}.{param}"] = tensor
    for (index, param), parts in qkv.items():
        out[f"blocks.{index}.attn.qkv.{param}"] = torch.cat([parts[n] for n in _QKV])
    out["head.decoder.weight"] = out["tok_emb.weight"]
    return out


BERT_ADAPTER = HFAdapter(
    model_type="bert",
    architecture="BertForMaskedLM",
    config_to_hf=bert_config_to_hf,
    config_from_hf=bert_config_from_hf,
    state_dict_to_hf=state_dict_to_hf,
    state_dict_from_hf=state_dict_from_hf,
)
