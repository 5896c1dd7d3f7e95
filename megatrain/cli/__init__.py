"""The commands: thin argument (or Hydra) layers over the library, each a console script.

    megatrain-prepare   prepare.py    a raw corpus → tokenizer + tokenized shards + manifest
    megatrain-train     train.py      the Hydra app: a training run, sweeps, SLURM jobs
    megatrain-generate  generate.py   sample text from a checkpoint
    megatrain-export    export.py     a checkpoint → a Hugging Face model folder
    megatrain-plan      plan.py       per-GPU memory of a setup, before launching it

Each also runs as ``python -m megatrain.<name>`` (the modules at the package's top level only
hand over to these). The library never imports this package.
"""
