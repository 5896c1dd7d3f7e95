"""One ``megatrain-eval`` run: a task over ``--data`` on a loaded model, as a result dict that
says what was measured, on what, with what (the checkpoint, the data's sha256, the settings, the
scorer's name, version and signature) and the numbers."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from megatrain.errors import ConfigError
from megatrain.eval import classify, lm, textgen
from megatrain.eval.inputs import (
    data_path,
    data_sha256,
    read_documents,
    read_pairs,
    read_task_samples,
)
from megatrain.eval.model import EvalModel, load_eval_model, require

TASKS = ("perplexity", "mlm", "target_loss", "accuracy", "bleu", "rouge")
LM_EVAL_PREFIX = "lm-eval:"


@dataclass
class Settings:
    """What decides the numbers besides the model and the data."""

    task: str
    batch_size: int = 8
    max_examples: int | None = None
    max_new_tokens: int = 128
    stride: int | None = None  # perplexity: default half the context
    seed: int = 0  # mlm's masks
    bleu_tokenize: str = "auto"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"--task {self.task} is not a task; valid: {', '.join(TASKS)}, "
                              f"or {LM_EVAL_PREFIX}TASK[,TASK...]")
        for name in ("batch_size", "max_examples", "max_new_tokens", "stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")


def evaluate(checkpoint: str, data: str, settings: Settings, out: Path,
             device: torch.device | str = "cpu") -> dict[str, Any]:
    """Run ``settings.task``; the result dict (also written to ``out``; a generation task's
    generations beside it)."""
    path = data_path(data)
    loaded = load_eval_model(checkpoint, device)
    start = time.perf_counter()
    metrics, scorer = _run_task(loaded, path, settings, out)
    result = {
        "task": settings.task,
        "checkpoint": checkpoint,
        "checkpoint_path": loaded.resolved,  # which step a run folder meant
        "model": {"family": loaded.family, "max_seq_len": loaded.max_seq_len},
        "data": {"path": str(path), "sha256": data_sha256(path)},
        "settings": {k: v for k, v in asdict(settings).items() if k != "task"},
        "scorer": scorer,
        "metrics": metrics,
        "seconds": round(time.perf_counter() - start, 3),
        "versions": {"torch": torch.__version__, "megatrain": _version()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def _run_task(loaded: EvalModel, path: Path, s: Settings, out: Path) -> tuple[dict, dict]:
    """(metrics, scorer info) of the task."""
    task, limit = s.task, s.max_examples
    if task == "perplexity":
        require(loaded, task, families=("gpt", "llama"))
        docs = read_documents(path, loaded, limit)
        return lm.perplexity(loaded, docs, stride=s.stride, batch_size=s.batch_size), \
            {"name": "megatrain sliding-window perplexity", "stride": s.stride
             or loaded.max_seq_len // 2}
    if task == "mlm":
        require(loaded, task, families=("bert",), classifier=False)
        docs = read_documents(path, loaded, limit)
        return lm.masked_lm(loaded, docs, seed=s.seed, batch_size=s.batch_size), \
            {"name": "megatrain masked LM (15%, 80/10/10, seeded per row)"}
    if task == "target_loss":
        require(loaded, task, families=("t5",))
        samples, dropped = read_task_samples(path, "seq2seq", loaded, limit=limit)
        return lm.target_loss(loaded, samples, batch_size=s.batch_size) | {"dropped": dropped}, \
            {"name": "megatrain seq2seq target loss"}
    if task == "accuracy":
        require(loaded, task, families=("bert",), classifier=True)
        names = classify.class_names(loaded)
        samples, dropped = read_task_samples(path, "cls", loaded, names, limit)
        gold, pred = classify.predict(loaded, samples, s.batch_size)
        return classify.accuracy_f1(gold, pred) | {"dropped": dropped}, \
            {"name": "megatrain accuracy / macro-F1", "labels": names}
    require(loaded, task, generates=True)
    return _generation_task(loaded, path, s, out)


def _generation_task(loaded: EvalModel, path: Path, s: Settings, out: Path
                     ) -> tuple[dict, dict]:
    """bleu / rouge over what the model generates for the rows; generations saved beside."""
    rows = read_pairs(path, s.max_examples)
    answers = textgen.answer(loaded.model, loaded.tokenizer, rows,
                             max_new_tokens=s.max_new_tokens, batch_size=s.batch_size)
    saved = textgen.generations_path(out)
    textgen.write_generations(saved, answers)
    metrics, scorer = answers.score(s.task, s.bleu_tokenize)
    return metrics | {"examples": len(rows), "generations": str(saved)}, scorer


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatrain")
    except PackageNotFoundError:
        return "unknown"
