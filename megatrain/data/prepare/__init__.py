"""Preparing a corpus (``megatrain-prepare``): sources → cleaning → tokenizer training → tokenized
tar shards → manifest, resumable through a journal, checked by ``verify``.

    sources.py          raw files, globs, folders, WebDataset shards (paths, brace patterns,
                        URLs), ``stdlib`` → documents
    clean.py            Unicode normalization, minimum length, exact dedup
    train_tokenizer.py  SentencePiece training with megatrain's options
    pipeline.py         the whole run: split, encode in worker processes, write, manifest
    tasks.py            task data (--format sft|cls|seq2seq): rows checked, encoded with masks,
                        labels or targets
    templates.py        sft templates (plain, alpaca, a tokenizer's chat_template) → marked pieces
    remote_out.py       ``--out URL``: staged locally, uploaded shard by shard with the journal
    shard_writer.py     tokenized samples → tar shards (the WebDataset layout)
    journal.py          which shards of an interrupted prepare are finished
    verify.py           ``--verify``: a prepared folder against its manifest
"""

from megatrain.data.prepare.pipeline import PrepareOptions, ensure_prepared, prepare

__all__ = ["PrepareOptions", "ensure_prepared", "prepare"]
