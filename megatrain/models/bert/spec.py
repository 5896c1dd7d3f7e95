"""The BERT family's registry entry: named sizes, objective, FLOPs, memory facts and Hugging
Face adapter."""

from __future__ import annotations

from megatrain.models.bert.hf import BERT_ADAPTER
from megatrain.models.bert.model import BertConfig, bert_flops_per_token, build_bert
from megatrain.models.spec import ActivationShape, ModelSpec, mlp4x_size


def _bert_size(n_layers: int, d_model: int, n_heads: int) -> dict:
    return mlp4x_size(n_layers, d_model, n_heads, max_seq_len=512)


BERT_SPEC = ModelSpec(
    family="bert",
    sizes={
        # CPU tests and the quickstart: gpt2-tiny's width (1.4M parameters with a 4096 vocabulary).
        "bert-tiny": _bert_size(4, 128, 4),
        "bert-base": _bert_size(12, 768, 12),  # 110M with BERT's 30522-token vocabulary
        "bert-large": _bert_size(24, 1024, 16),  # 335M
    },
    config_cls=BertConfig,
    build=build_bert,
    objective="mlm",
    flops_per_token=bert_flops_per_token,
    # after the blocks: the embedding LayerNorm's input and the MLM head's dense, GELU,
    # LayerNorm and decoder inputs
    activations=ActivationShape(norm="layer", gated=False, head_norms=0, head_units=5),
    hf=BERT_ADAPTER,
)
