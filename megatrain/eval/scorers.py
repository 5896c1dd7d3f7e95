"""BLEU through ``sacrebleu`` and ROUGE through ``rouge-score`` (the ``megatrain[eval]``
extra), with tokenizers that keep non-English text.

- BLEU's tokenizer: ``--bleu-tokenize``, or ``auto``: ``zh`` when most of the references'
  non-space characters are CJK ideographs (Chinese), else sacrebleu's default ``13a``. Japanese
  wants ``ja-mecab`` (``pip install "sacrebleu[ja]"``), which must be asked for by name. The
  score is sacrebleu's corpus BLEU (0-100) and its signature is stored with it.
- ROUGE-1/2/L/Lsum: rouge-score's ``RougeScorer`` with :class:`UnicodeTokenizer` instead of its
  default, which keeps only ``[a-z0-9]`` and scores Chinese as empty: text is lowercased, each
  CJK ideograph or kana is a token of its own, other runs of letters and digits (any script) are
  tokens, everything else separates. On ASCII text it tokenizes as the default does (without
  stemming). Scores are the mean over examples of each example's F-measure (0-1), with the mean
  precision and recall beside it; ``rougeLsum`` splits summaries into sentences on newlines.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from megatrain.errors import ConfigError

EXTRA = 'pip install "megatrain[eval]"'
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_IDEOGRAPHS = ("\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK (+ extension A, compatibility)
               "\U00020000-\U0002ffff")  # extensions B-F
_CJK = "\u3040-\u30ff" + _IDEOGRAPHS  # with hiragana and katakana
_HAN = re.compile(f"[{_IDEOGRAPHS}]")
_TOKEN = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])[^\\W_])+")


def _require(module: str, package: str) -> Any:
    """Import an optional scorer, or a ConfigError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"this task needs {package}: {EXTRA}") from exc


def pick_bleu_tokenize(references: Sequence[str], choice: str = "auto") -> str:
    """``choice``, or for ``auto`` ``zh`` when over half of the references' non-space
    characters are CJK ideographs, else ``13a``."""
    if choice != "auto":
        return choice
    chars = sum(len(r) - sum(c.isspace() for c in r) for r in references)
    han = sum(len(_HAN.findall(r)) for r in references)
    return "zh" if chars and han / chars > 0.5 else "13a"


def bleu(hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "auto"
         ) -> tuple[dict[str, Any], dict[str, str]]:
    """(corpus BLEU and its parts, scorer info with sacrebleu's signature)."""
    sacrebleu = _require("sacrebleu", "sacrebleu")
    tokenize = pick_bleu_tokenize(references, tokenize)
    if tokenize not in sacrebleu.BLEU.TOKENIZERS:
        raise ConfigError(f"--bleu-tokenize {tokenize} is not a sacrebleu tokenizer; valid: auto, "
                          f"{', '.join(sacrebleu.BLEU.TOKENIZERS)}")
    try:
        metric = sacrebleu.BLEU(tokenize=tokenize)
    except (ImportError, RuntimeError) as exc:  # ja-mecab, ko-mecab, spm without their packages
        hint = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ConfigError(f"--bleu-tokenize {tokenize}: {hint}") from exc
    result = metric.corpus_score(list(hypotheses), [list(references)])
    numbers = {"bleu": result.score, "precisions": list(result.precisions),
               "brevity_penalty": result.bp, "sys_len": result.sys_len,
               "ref_len": result.ref_len}
    return numbers, {"name": "sacrebleu", "version": sacrebleu.__version__,
                     "signature": str(metric.get_signature()), "tokenize": tokenize}


class UnicodeTokenizer:
    """rouge-score's tokenizer interface (``tokenize(text) -> tokens``), keeping every script
    (module doc)."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


def rouge_scorer() -> Any:
    """rouge-score's ``RougeScorer`` over ROUGE-1/2/L/Lsum with :class:`UnicodeTokenizer`."""
    module = _require("rouge_score.rouge_scorer", "rouge-score")
    return module.RougeScorer(list(ROUGE_TYPES), tokenizer=UnicodeTokenizer())


def rouge(hypotheses: Sequence[str], references: Sequence[str]
          ) -> tuple[dict[str, float], dict[str, str]]:
    """(mean F-measure, precision and recall of each ROUGE type, scorer info)."""
    from importlib.metadata import version

    scorer = rouge_scorer()
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
    numbers: dict[str, float] = {}
    for kind in ROUGE_TYPES:
        for part, suffix in (("fmeasure", ""), ("precision", "_precision"),
                             ("recall", "_recall")):
            numbers[kind + suffix] = sum(getattr(s[kind], part) for s in scores) / len(scores)
    return numbers, {"name": "rouge-score", "version": version("rouge-score"),
                     "tokenizer": "megatrain UnicodeTokenizer (CJK characters as tokens, "
                                  "lowercased, no stemming)"}
