"""Data pipeline: tokenizer, sources, shard writer (prepare), manifest and streaming reader.

The streaming reader's names are imported on first use (PEP 562), so ``megatrain-prepare`` and
its worker processes do not pay for importing torch, which only the stream needs.
"""

from __future__ import annotations

import importlib
from typing import Any

from megatrain.data.manifest import Manifest, ShardInfo
from megatrain.data.prepare import ensure_prepared, prepare
from megatrain.data.sources import Document, iter_documents
from megatrain.data.tokenizer import Tokenizer, train_tokenizer

_LAZY = {
    "TrainStream": "megatrain.data.stream",
    "build_train_stream": "megatrain.data.stream",
    "iter_eval_batches": "megatrain.data.stream",
}

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


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
