"""BERT family: a bidirectional encoder trained with masked language modelling.

The registry's spec lives in ``megatrain.models.bert.spec`` (it needs the Hugging Face adapter,
which needs this package's config).
"""

from megatrain.models.bert.model import (
    Bert,
    BertConfig,
    PostNormBlock,
    bert_flops_per_token,
    build_bert,
)

__all__ = ["Bert", "BertConfig", "PostNormBlock", "bert_flops_per_token", "build_bert"]
