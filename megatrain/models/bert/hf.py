"""megatrain BERT <-> Hugging Face ``BertForMaskedLM``.

Names map one to one except that megatrain fuses query, key and value into one projection (split
here into three equal parts, weights and biases alike). Both sides tie the MLM decoder's weight to
the word embeddings; HF also aliases the decoder's bias as ``cls.predictions.bias``. Only the
post-LN model has a BertForMaskedLM layout: a pre-LN one is refused with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatrain.errors import ConfigError
from megatrain.models.bert.model import BertConfig
from megatrain.models.common.hf import Fields, HFAdapter, StateDict, fields_from_hf, fields_to_hf
from megatrain.models.common.keymap import KeyMap, Rule, aliased, fused, params, rename, tied, under

if TYPE_CHECKING:
    from transformers import BertConfig as HFBertConfig

# megatrain BertConfig field -> HF BertConfig attribute, the same value both ways
_FIELDS: Fields = (
    ("vocab_size", "vocab_size"), ("d_model", "hidden_size"), ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"), ("d_ff", "intermediate_size"),
    ("dropout", "hidden_dropout_prob"), ("max_seq_len", "max_position_embeddings"),
    ("type_vocab_size", "type_vocab_size"), ("norm_eps", "layer_norm_eps"),
)

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
        **fields_to_hf(_FIELDS, config),
        hidden_act="gelu",  # exact (erf) GELU, as megatrain's BERT
        attention_probs_dropout_prob=config.dropout,
        pad_token_id=None,  # the export sets the tokenizer's
        tie_word_embeddings=True,
        is_decoder=False,
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
    return BertConfig(**fields_from_hf(_FIELDS, hf_config))


def _qkv(param: str) -> Rule:
    """megatrain's fused query/key/value (weight or bias): three equal row blocks."""
    return fused(f"attn.qkv.{param}", tuple(f"attention.self.{part}.{param}"
                                            for part in ("query", "key", "value")))


def _current_name(name: str) -> str:
    """Checkpoints from the TensorFlow port name LayerNorm parameters gamma / beta."""
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                      "LayerNorm.bias")


KEYS = KeyMap(
    "BERT",
    rules=(
        rename("tok_emb.weight", "bert.embeddings.word_embeddings.weight"),
        rename("pos_emb.weight", "bert.embeddings.position_embeddings.weight"),
        rename("type_emb.weight", "bert.embeddings.token_type_embeddings.weight"),
        *params("emb_ln", "bert.embeddings.LayerNorm"),
        *params("head.dense", "cls.predictions.transform.dense"),
        *params("head.ln", "cls.predictions.transform.LayerNorm"),
        tied("head.decoder.weight", "cls.predictions.decoder.weight", source="tok_emb.weight"),
        aliased("head.decoder.bias", "cls.predictions.bias", "cls.predictions.decoder.bias"),
        *under("blocks.*.", "bert.encoder.layer.*.", (
            _qkv("weight"),
            _qkv("bias"),
            *params("attn.proj", "attention.output.dense"),
            *params("ln_1", "attention.output.LayerNorm"),
            *params("mlp.fc", "intermediate.dense"),
            *params("mlp.proj", "output.dense"),
            *params("ln_2", "output.LayerNorm"),
        )),
    ),
    # BertForPreTraining's pooler and NSP head, and an old buffer: not used
    hf_ignored=("bert.pooler.dense.weight", "bert.pooler.dense.bias",
                "cls.seq_relationship.weight", "cls.seq_relationship.bias",
                "bert.embeddings.position_ids"),
    hf_spelling=_current_name,
)
state_dict_from_hf = KEYS.from_hf


def state_dict_to_hf(sd: StateDict) -> StateDict:
    """megatrain BERT state dict -> BertForMaskedLM state dict; a pre-LN one (its final ``ln_f``
    has no place there) is a ConfigError that says why."""
    if any(name.startswith("ln_f.") for name in sd):
        raise ConfigError(_PRE_LN_REFUSAL)
    return KEYS.to_hf(sd)


BERT_ADAPTER = HFAdapter(model_type="bert", architecture="BertForMaskedLM",
                         config_to_hf=bert_config_to_hf, config_from_hf=bert_config_from_hf,
                         state_dict_to_hf=state_dict_to_hf, state_dict_from_hf=state_dict_from_hf)
