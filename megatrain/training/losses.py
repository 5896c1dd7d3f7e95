"""Losses and eval sums of every objective, from the model's outputs and the batch's labels.

A model returns token logits (B, T, V) for the language-model objectives (clm, mlm, span, sft,
seq2seq), class logits (B, C) for classification, or ``(mlm_logits, nsp_logits)`` for BERT's
masked LM with sentence-pair prediction. Labels of -100 are ignored throughout.

MLM + NSP is trained, as in BERT and Hugging Face's ``BertForPreTraining``, on the sum of the
two mean losses; both parts are logged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from megatrain.data.stream.objectives import IGNORE

LABEL_KEYS = ("labels", "nsp_labels")  # batch keys that are targets, not model inputs

Outputs = Tensor | tuple[Tensor, Tensor]


def model_inputs(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The batch's model inputs (every key but the targets), on ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in LABEL_KEYS}


def _ce(logits: Tensor, labels: Tensor, reduction: str) -> Tensor:
    """Cross-entropy in fp32 over every position with a label (tokens or rows)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE, reduction=reduction)


def training_loss(outputs: Outputs, batch: dict[str, Tensor],
                  reduction: str = "mean") -> tuple[Tensor, dict[str, Tensor]]:
    """The loss to back-propagate (mean over labelled positions, or their sum) and its detached
    parts worth logging separately (MLM + NSP: ``mlm_loss``, ``nsp_loss``)."""
    labels = batch["labels"].to(_device(outputs), non_blocking=True)
    if isinstance(outputs, tuple):
        mlm_logits, nsp_logits = outputs
        nsp_labels = batch["nsp_labels"].to(nsp_logits.device, non_blocking=True)
        mlm, nsp = _ce(mlm_logits, labels, reduction), _ce(nsp_logits, nsp_labels, reduction)
        return mlm + nsp, {"mlm_loss": mlm.detach(), "nsp_loss": nsp.detach()}
    return _ce(outputs, labels, reduction), {}


def eval_sums(outputs: Outputs, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sums over one eval batch that add up across batches and ranks: ``loss`` and ``count``
    (labelled positions), and ``correct`` predictions for classification and NSP."""
    device = _device(outputs)
    labels = batch["labels"].to(device)
    if isinstance(outputs, tuple):
        mlm_logits, nsp_logits = outputs
        nsp_labels = batch["nsp_labels"].to(device)
        return {"loss": _ce(mlm_logits, labels, "sum"), "count": _labelled(labels),
                "nsp_loss": _ce(nsp_logits, nsp_labels, "sum"),
                "nsp_count": _labelled(nsp_labels),
                "nsp_correct": _correct(nsp_logits, nsp_labels)}
    sums = {"loss": _ce(outputs, labels, "sum"), "count": _labelled(labels)}
    if outputs.dim() == 2:  # classification
        sums["correct"] = _correct(outputs, labels)
    return sums


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The eval metrics of summed :func:`eval_sums`: ``eval_loss`` (the training loss's
    definition), ``eval_ppl`` for token objectives, accuracies, NSP's parts."""
    loss = sums["loss"] / sums["count"]
    if "nsp_loss" in sums:
        nsp = sums["nsp_loss"] / max(1.0, sums["nsp_count"])
        return {"eval_loss": loss + nsp, "eval_mlm_loss": loss, "eval_nsp_loss": nsp,
                "eval_nsp_accuracy": sums["nsp_correct"] / max(1.0, sums["nsp_count"])}
    if "correct" in sums:
        return {"eval_loss": loss, "eval_accuracy": sums["correct"] / sums["count"]}
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}


def eval_metric_names(objective: str, nsp: bool) -> list[str]:
    """The metrics :func:`eval_metrics` reports for ``objective``: what ``trainer.keep_best`` can
    choose from."""
    if nsp:
        return ["eval_loss", "eval_mlm_loss", "eval_nsp_loss", "eval_nsp_accuracy"]
    if objective == "cls":
        return ["eval_loss", "eval_accuracy"]
    return ["eval_loss", "eval_ppl"]


def _labelled(labels: Tensor) -> Tensor:
    return (labels != IGNORE).sum().float()


def _correct(logits: Tensor, labels: Tensor) -> Tensor:
    return ((logits.argmax(-1) == labels) & (labels != IGNORE)).sum().float()


def _device(outputs: Outputs) -> torch.device:
    return (outputs[0] if isinstance(outputs, tuple) else outputs).device
