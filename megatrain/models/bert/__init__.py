"""BERT (``model.family=bert``): a bidirectional encoder trained with masked language modelling."""

from megatrain.models.bert.model import (
    Bert,
    BertConfig,
    PostNormBlock,
    bert_flops_per_token,
    build_bert,
)

__all__ = ["Bert", "BertConfig", "PostNormBlock", "bert_flops_per_token", "build_bert"]
