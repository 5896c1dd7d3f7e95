"""``trainer.eval_generate``: each in-training eval also runs a ``bleu`` / ``rouge`` task on the
live model, with megatrain-eval's code (:func:`textgen.answer`, :meth:`Answers.score`), so the
numbers are those ``megatrain-eval`` gives for the checkpoint saved at that step.

Every rank generates the same answers: the same rows in the same batches, greedy, and each batch
runs all ``max_new_tokens`` steps when there are several ranks (``lockstep``). Under ZeRO-3 each
forward gathers the weights collectively, so every rank must make the same forward calls; with
lockstep their number follows from the prompts alone, not from when each rank's rows reached
EOS. Rank 0 scores, and its numbers are broadcast, so every rank holds the same eval row
(``trainer.keep_best`` then decides the same save everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatrain.config.schema import EvalGenerateConfig
from megatrain.data.prepare.templates import Template
from megatrain.data.tokenizer import Tokenizer
from megatrain.errors import ConfigError, DataError
from megatrain.eval.inputs import read_pairs
from megatrain.eval.textgen import HEADLINE, answer, score
from megatrain.models.registry import get_model_spec

KEY = "trainer.eval_generate"
TABLE_KEY = "eval_samples"  # the W&B table of each eval's first table_rows answers


@dataclass
class GenerationEval:
    """The task, its settings and the rows it answers (read once, at the start)."""

    cfg: EvalGenerateConfig
    rows: list[tuple[str, str, bool]]

    @classmethod
    def build(cls, cfg: EvalGenerateConfig, family: str) -> GenerationEval | None:
        """None when ``task`` is unset; else the rows, checked: the task, that the family
        generates, the file and its fields, the scorer (installed, its tokenizer). Each
        failure is a one-line ConfigError naming the key."""
        if cfg.task is None:
            return None
        if cfg.task not in HEADLINE:
            raise ConfigError(f"{KEY}.task={cfg.task} is not a generation task; valid: "
                              f"{', '.join(HEADLINE)} (null: off)")
        if not get_model_spec(family).generates:
            raise ConfigError(f"{KEY}.task={cfg.task}: model.family={family} does not generate "
                              "text (gpt, llama or t5 do); unset it")
        if not cfg.data:
            raise ConfigError(f"{KEY}.data: set the JSONL of {{\"input\", \"target\"}} or "
                              f"{{\"prompt\", \"completion\"}} rows that {KEY}.task scores")
        path = Path(cfg.data).expanduser()
        if not path.is_file():
            raise ConfigError(f"{KEY}.data={cfg.data} is not a file")
        try:
            rows = read_pairs(path, cfg.max_examples)
            # the references scored against themselves: a missing scorer package or an unknown
            # BLEU tokenizer fails now, not at the first eval
            score(cfg.task, [rows[0][1]], [rows[0][1]], cfg.bleu_tokenize)
        except (ConfigError, DataError) as exc:
            raise ConfigError(f"{KEY}: {exc}") from exc
        return cls(cfg, rows)

    @property
    def metric_names(self) -> list[str]:
        """The eval row's keys this adds (``eval_bleu``, or ``eval_rouge1`` ...)."""
        return [f"eval_{name}" for name in HEADLINE[self.cfg.task]]

    def run(self, model: nn.Module, tokenizer: Tokenizer, *, main: bool, lockstep: bool,
            template: Template | None = None, device: torch.device | None = None
            ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """(the eval row's numbers, the first ``table_rows`` answers) on every rank; the answers
        on ``main`` only. Every rank must call it (see the module's doc)."""
        cfg = self.cfg
        answers = answer(model, tokenizer, self.rows, max_new_tokens=cfg.max_new_tokens,
                         batch_size=cfg.batch_size, template=template, lockstep=lockstep)
        numbers: dict[str, float] = {}
        if main:
            scores, _ = answers.score(cfg.task, cfg.bleu_tokenize)
            numbers = {f"eval_{name}": float(scores[name]) for name in HEADLINE[cfg.task]}
        if dist.is_initialized():
            shared = [numbers]
            dist.broadcast_object_list(shared, src=0, device=device)
            numbers = shared[0]
        return numbers, answers.rows(cfg.table_rows) if main and cfg.table_rows else []

