"""Streaming a prepared corpus to the trainer: deterministic, elastic, resumable, packed.

    order.py          each source's global order per epoch, a reader's position in it
    elastic.py        re-splitting saved positions over another number of readers
    shard_reader.py   one shard read with per-sample fault isolation (and remote retries)
    mixture.py        weighted sources
    packing.py        documents → fixed-size windows
    objectives.py     a window → a model's batch (clm, mlm, span, mlm + sentence pairs)
    tasks.py          task samples → batches (sft, cls, seq2seq), whole samples per row
    targets.py        what every objective's labels share (IGNORE)
    train_stream.py   readers in DataLoader workers → batches; its state for checkpoints
    trace.py          ``data.trace``: the documents each step consumed
"""

from megatrain.data.stream.train_stream import TrainStream, build_train_stream, iter_eval_batches

__all__ = ["TrainStream", "build_train_stream", "iter_eval_batches"]
