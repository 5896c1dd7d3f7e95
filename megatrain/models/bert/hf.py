"""megatrain BERT <-> Hugging Face ``BertForMaskedLM``, ``BertForPreTraining`` (``nsp``) and
``BertForSequenceClassification`` (``num_labels``).

Names map one to one except that megatrain fuses query, key and value into one projection (split
here into three equal parts, weights and biases alike). Both sides tie the MLM decoder's weight to
the word embeddings; HF also aliases the decoder's bias as ``cls.predictions.bias``. Which heads a
model has follows config.json's ``architectures`` on the way in (any other than those three,
e.g. a ``BertModel`` or none, reads as the masked LM), and its megatrain config on the way out.
Weights are converted head by head as found, so a folder whose weights carry more heads than its
architecture (Google's BERTs: BertForMaskedLM with the pooler and NSP head) converts too; the
registry drops the heads its config has not. Only the post-LN model has a Hugging Face layout: a
pre-LN one is refused with the reason.
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

MLM, PRETRAINING, CLASSIFIER = ("BertForMaskedLM", "BertForPreTraining",
                                 "BertForSequenceClassification")


def _pre_ln_refusal(architecture: str) -> str:
    return (f"model.norm_position=pre cannot be exported to {architecture}: Hugging Face's BERT "
            "is post-LayerNorm only (each block normalises after its residual sum, the "
            "embeddings are normalised and there is no final LayerNorm), so a pre-LN model would "
            "compute different outputs there; train with model.norm_position=post to export")


def bert_architecture(config: BertConfig) -> str:
    """The transformers class with ``config``'s heads."""
    return CLASSIFIER if config.num_labels else PRETRAINING if config.nsp else MLM


def bert_config_to_hf(config: BertConfig) -> HFBertConfig:
    """The HF config (``architectures`` naming the class with the model's heads) of a post-LN
    megatrain BERT; a pre-LN one is a ConfigError."""
    from transformers import BertConfig as HFBertConfig

    if config.norm_position != "post":
        raise ConfigError(_pre_ln_refusal(bert_architecture(config)))
    classes = {"num_labels": config.num_labels,
               "problem_type": "single_label_classification"} if config.num_labels else {}
    return HFBertConfig(
        **fields_to_hf(_FIELDS, config),
        hidden_act="gelu",  # exact (erf) GELU, as megatrain's BERT
        attention_probs_dropout_prob=config.dropout,
        pad_token_id=None,  # the export sets the tokenizer's
        tie_word_embeddings=True,
        is_decoder=False,
        architectures=[bert_architecture(config)],
        **classes,
    )


def _heads_from_hf(hf_config: HFBertConfig) -> dict[str, int | bool]:
    """The megatrain heads of the HF config's ``architectures``; a BERT class with another head
    (question answering, token classification, ...) is refused."""
    names = set(hf_config.architectures or ())
    if CLASSIFIER in names:
        return {"num_labels": hf_config.num_labels}
    if PRETRAINING in names:
        return {"nsp": True}
    other = sorted(n for n in names if n.startswith("BertFor") and n != MLM)
    if other:
        raise ValueError(f"HF architecture {other[0]} is not supported; megatrain's BERT is "
                         f"{MLM}, {PRETRAINING} or {CLASSIFIER}")
    return {}


def bert_config_from_hf(hf_config: HFBertConfig) -> BertConfig:
    """A BertConfig for a HF BERT, with the heads of its architecture; rejects the variants
    megatrain's BERT does not model."""
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
    return BertConfig(**fields_from_hf(_FIELDS, hf_config), **_heads_from_hf(hf_config))


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
        tied("head.decoder.weight", "cls.predictions.decoder.weight", source="tok_emb.weight",
             if_present="head.decoder.bias"),  # a classifier has no MLM head
        aliased("head.decoder.bias", "cls.predictions.bias", "cls.predictions.decoder.bias"),
        *params("pooler.dense", "bert.pooler.dense"),
        *params("nsp_head", "cls.seq_relationship"),
        *params("classifier", "classifier"),
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
    hf_ignored=("bert.embeddings.position_ids",),  # an old buffer
    hf_spelling=_current_name,
)
state_dict_from_hf = KEYS.from_hf


def state_dict_to_hf(sd: StateDict) -> StateDict:
    """megatrain BERT state dict -> the HF state dict of its class; a pre-LN one (its final
    ``ln_f`` has no place there) is a ConfigError that says why."""
    if any(name.startswith("ln_f.") for name in sd):
        architecture = CLASSIFIER if "classifier.weight" in sd else \
            PRETRAINING if "nsp_head.weight" in sd else MLM
        raise ConfigError(_pre_ln_refusal(architecture))
    return KEYS.to_hf(sd)


BERT_ADAPTER = HFAdapter(model_type="bert", architecture=MLM,
                         config_to_hf=bert_config_to_hf, config_from_hf=bert_config_from_hf,
                         state_dict_to_hf=state_dict_to_hf, state_dict_from_hf=state_dict_from_hf)
