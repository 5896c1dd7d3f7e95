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
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from megatrain.data.prepare.templates import PlainTemplate, Template, prompt_pieces
from megatrain.data.tokenizer import Tokenizer
from megatrain.eval import scorers
from megatrain.models.generation import generate_text

HEADLINE = {"bleu": ("bleu",), "rouge": scorers.ROUGE_TYPES}
"""The numbers of each task that stand for it (the F-measures for ROUGE): what training logs."""


@dataclass
class Answers:
    """A generation task's rows and what the model wrote for each."""

    prompts: list[str]  # as the model read them
    references: list[str]
    generations: list[str]

    def score(self, task: str, bleu_tokenize: str = "auto") -> tuple[dict, dict]:
        """(numbers, scorer info) of ``task`` (bleu | rouge) over the answers."""
        return score(task, self.generations, self.references, bleu_tokenize)

    def rows(self, limit: int | None = None) -> list[dict[str, str]]:
        """The first ``limit`` rows as ``{"prompt", "reference", "generation"}`` (the saved
        generations' lines, a W&B table's rows)."""
        triples = list(zip(self.prompts, self.references, self.generations))[:limit]
        return [{"prompt": p, "reference": r, "generation": g} for p, r, g in triples]


def answer(model: nn.Module, tokenizer: Tokenizer, rows: Sequence[tuple[str, str, bool]], *,
           max_new_tokens: int, batch_size: int, template: Template | None = None,
           lockstep: bool = False) -> Answers:
    """The model's greedy answers to ``rows`` (``inputs.read_pairs``): what megatrain-eval's
    bleu / rouge and training's ``trainer.eval_generate`` score. ``template``: how an SFT row's
    prompt is rendered (default plain); ``lockstep``: see :func:`generate_texts`."""
    prompts = [prompt_text(p, sft, template) for p, _, sft in rows]
    generations = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, lockstep=lockstep)
    return Answers(prompts, [r for _, r, _ in rows], generations)


def generate_texts(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], *,
                   max_new_tokens: int, batch_size: int, lockstep: bool = False) -> list[str]:
    """Greedy continuations of ``prompts`` (the prompt not included, cut at EOS): the one
    place megatrain-eval calls the generation code (batched, left-padded, KV-cached).

    ``lockstep``: every batch runs all ``max_new_tokens`` steps instead of stopping once its
    rows reached EOS, so the number of forward calls depends on the prompts alone. Ranks of a
    ZeRO-3 model must make the same calls (each gathers weights collectively) and must not
    depend on agreeing, token for token, on when every row ended. The text is the same: a row
    is cut at its first EOS either way."""
    return generate_text(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                         batch_size=batch_size, temperature=0.0, stop_early=not lockstep)


def prompt_text(prompt: str, sft: bool, template: Template | None = None) -> str:
    """What the model reads: an SFT row's prompt rendered by ``template`` (default the plain
    one), else as is."""
    return "".join(prompt_pieces(template or PlainTemplate(), prompt)) if sft else prompt


def generations_path(out: Path) -> Path:
    """``results.json`` -> ``results.generations.jsonl`` beside it."""
    return out.with_name(out.stem + ".generations.jsonl")


def write_generations(path: Path, answers: Answers) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in answers.rows():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def score(task: str, generations: Sequence[str], references: Sequence[str],
          bleu_tokenize: str = "auto") -> tuple[dict, dict]:
    """(numbers, scorer info) of ``task`` (bleu | rouge)."""
    if task == "bleu":
        return scorers.bleu(generations, references, bleu_tokenize)
    return scorers.rouge(generations, references)
