"""Data pipeline: tokenizer, sources, shard writer (prepare), manifest and streaming reader."""

from megatrain.data.manifest import Manifest, ShardInfo
from megatrain.data.prepare import ensure_prepared, prepare
from megatrain.data.sources import Document, iter_documents
from megatrain.data.stream import TrainStream, build_train_stream, iter_eval_batches
from megatrain.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "Document",
    "Manifest",
    "ShardInfo",
    "Tokenizer",
    "TrainStream",
    "build_train_stream",
    "ensure_prepared",
    "iter_documents",
    "iter_eval_batches",
    "prepare",
    "train_tokenizer",
]
