"""``accuracy``: a BERT classifier (``num_labels`` heads) on cls rows, scored by accuracy and
macro-F1. Rows are tokenized and truncated exactly as ``megatrain-prepare --format cls`` and the
cls objective do; labels are matched by the checkpoint's class names (meta.json ``labels``, an
``hf:`` folder's ``id2label``), or are the class ids themselves when it has none."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch

from megatrain.data.stream.tasks import build_task_objective
from megatrain.eval.inputs import TaskSample
from megatrain.eval.model import EvalModel


def class_names(loaded: EvalModel) -> list[str]:
    """The model's class names, index = class id; ``"0"``, ``"1"``, ... when it has none."""
    count = loaded.model.config.num_labels
    return list(loaded.labels) if loaded.labels else [str(i) for i in range(count)]


@torch.no_grad()
def predict(loaded: EvalModel, samples: Sequence[TaskSample], batch_size: int = 8
            ) -> tuple[list[int], list[int]]:
    """(gold class ids, predicted class ids)."""
    objective = build_task_objective("cls", loaded.max_seq_len, loaded.tokenizer,
                                     num_labels=loaded.model.config.num_labels)
    picked = [objective.sample(SimpleNamespace(tokens=s.tokens, extra=s.extra, key=str(i)))
              for i, s in enumerate(samples)]
    gold, pred = [], []
    for start in range(0, len(picked), batch_size):
        batch = objective.collate([[s] for s in picked[start : start + batch_size]])
        logits = loaded.model(batch["input_ids"].to(loaded.device),
                              attention_mask=batch["attention_mask"].to(loaded.device),
                              token_type_ids=batch["token_type_ids"].to(loaded.device))
        gold += batch["labels"].tolist()
        pred += logits.argmax(-1).tolist()
    return gold, pred


def accuracy_f1(gold: Sequence[int], pred: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean of each class's F1 over the classes that occur in
    ``gold`` or ``pred``: scikit-learn's ``f1_score(average="macro")``)."""
    classes = sorted(set(gold) | set(pred))
    f1s = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        wrong = sum((g == c) != (p == c) for g, p in zip(gold, pred))  # FP + FN
        f1s.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    correct = sum(g == p for g, p in zip(gold, pred))
    return {"accuracy": correct / len(gold), "macro_f1": sum(f1s) / len(f1s),
            "examples": len(gold)}
