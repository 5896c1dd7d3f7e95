"""``bleu`` and ``rouge``: the model generates an answer to each row's prompt (``input`` or
``prompt``), greedily, and the answers are scored against the references (``target`` or
``completion``). A ``{"prompt", "completion"}`` row is prompted as SFT training rendered it
(the ``plain`` template: the prompt, then a newline); an ``{"input", "target"}`` row's input is
read as written (T5's encoder gets it with EOS, as seq2seq fine-tuning feeds it). The
generations are written beside the scores (``<out>.generations.jsonl``: prompt, reference,
generation per line) so the numbers can be recomputed by anyone."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from megatrain.data.prepare.templates import PlainTemplate, prompt_pieces
from megatrain.eval import scorers
from megatrain.eval.model import EvalModel
from megatrain.models.generation import generate_text


def generate_texts(loaded: EvalModel, prompts: Sequence[str], *, max_new_tokens: int,
                   batch_size: int) -> list[str]:
    """Greedy continuations of ``prompts`` (the prompt not included, cut at EOS): the one
    place megatrain-eval calls the generation code (batched, left-padded, KV-cached)."""
    return generate_text(loaded.model, loaded.tokenizer, list(prompts),
                         max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=0.0)


def prompt_text(prompt: str, sft: bool) -> str:
    """What the model reads: an SFT row's prompt rendered by the plain template, else as is."""
    return "".join(prompt_pieces(PlainTemplate(), prompt)) if sft else prompt


def generations_path(out: Path) -> Path:
    """``results.json`` -> ``results.generations.jsonl`` beside it."""
    return out.with_name(out.stem + ".generations.jsonl")


def write_generations(path: Path, prompts: Sequence[str], references: Sequence[str],
                      generations: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p, r, g in zip(prompts, references, generations):
            f.write(json.dumps({"prompt": p, "reference": r, "generation": g},
                               ensure_ascii=False) + "\n")


def score(task: str, generations: Sequence[str], references: Sequence[str],
          bleu_tokenize: str = "auto") -> tuple[dict, dict]:
    """(numbers, scorer info) of ``task`` (bleu | rouge)."""
    if task == "bleu":
        return scorers.bleu(generations, references, bleu_tokenize)
    return scorers.rouge(generations, references)
