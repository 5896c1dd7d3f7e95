"""Data: preparing a corpus (``prepare/``) and streaming it to the trainer (``stream/``), with
what both share beside them: the tokenizer (``tokenizer/``), the manifest and the tar format.

Nothing is imported here, so ``megatrain-prepare`` and its worker processes never pay for
torch, which only the stream needs.
"""
