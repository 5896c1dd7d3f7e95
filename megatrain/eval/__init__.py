"""``megatrain-eval``: a trained model judged on held-out data (docs/evaluation.md).

- ``model.py``: a checkpoint or ``hf:`` folder loaded for evaluation, with its class names;
- ``inputs.py``: what ``--data`` names (a text file, a JSONL of rows, a prepared folder) as
  documents or task rows, and its sha256;
- ``lm.py``: ``perplexity`` (per document, sliding window), ``mlm`` (BERT), ``target_loss`` (T5);
- ``classify.py``: ``accuracy`` and macro-F1 of BERT classifiers;
- ``textgen.py``: ``bleu`` and ``rouge`` over generated text; ``scorers.py`` wraps ``sacrebleu``
  and ``rouge-score`` (the ``megatrain[eval]`` extra);
- ``run.py``: one task run into a result dict (checkpoint, data hash, settings, scorer, numbers);
- ``lm_harness.py``: the lm-evaluation-harness adapter.
- ``during_training.py``: ``trainer.eval_generate``, a bleu / rouge task at each training eval.
"""
