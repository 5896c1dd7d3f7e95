"""Losses and eval sums of every objective, from the model's outputs and the batch's labels.

A model returns token logits (B, T, V) for the language-model objectives (clm, mlm, span, sft,
seq2seq), class logits (B, C) for classification, or ``(mlm_logits, nsp_logits)`` for BERT's
masked LM with sentence-pair prediction. Labels of -100 are ignored throughout.

With a chunked loss (``trainer.chunked_loss``, :func:`loss_chunk`) the model gets the labels
too and returns, in place of the token logits, their cross-entropy already summed over the
labelled tokens (a 0-dim fp32 tensor, ``megatrain.models.common.chunked_ce``): the whole
(tokens, vocab) logits never exist. Both give the same loss and gradients.

MLM + NSP is trained, as in BERT and Hugging Face's ``BertForPreTraining``, on the sum of the
two mean losses; both parts are logged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from megatrain.data.stream.objectives import IGNORE
from megatrain.errors import ConfigError

LABEL_KEYS = ("labels", "nsp_labels")  # batch keys that are targets, not model inputs

Outputs = Tensor | tuple[Tensor, Tensor]


# Each chunk holds about CHUNK_LOGITS logits (128 MB in fp32: 256 rows of a 128k vocabulary);
# auto chunks a micro-batch whose logits reach AUTO_MIN_LOGITS (0.5 GB in fp32, about 2 GB of
# loss peak, and at least 4 chunks): below that the recomputed matmul costs more than the
# memory is worth (tools/bench_loss_memory.py, docs/benchmarks.md).
AUTO_MIN_LOGITS = 1 << 27
CHUNK_LOGITS = 1 << 25
CHUNKED_LOSS = ("auto", "on", "off")


def check_chunked_loss(setting: str) -> str:
    """``setting`` if it is a ``trainer.chunked_loss`` value, else a ConfigError."""
    if setting not in CHUNKED_LOSS:
        raise ConfigError(f"trainer.chunked_loss={setting!r} is not one of "
                          f"{', '.join(CHUNKED_LOSS)}")
    return setting


def loss_chunk(setting: str, vocab_size: int, tokens: int) -> int:
    """Rows of logits per chunk of the loss for micro-batches of ``tokens`` output tokens over
    ``vocab_size`` classes; 0: the whole logits (``off``, or ``auto`` below AUTO_MIN_LOGITS)."""
    return _chunk_rows(check_chunked_loss(setting), vocab_size, tokens)


def _chunk_rows(setting: str, vocab_size: int, tokens: int) -> int:
    """:func:`loss_chunk` of a ``setting`` already checked (per micro-batch: the trainer checks
    ``trainer.chunked_loss`` once, at start-up)."""
    if setting == "off" or (setting == "auto" and vocab_size * tokens < AUTO_MIN_LOGITS):
        return 0
    return max(1, min(tokens, CHUNK_LOGITS // vocab_size))


BPB_OBJECTIVE = "clm"  # the objective whose eval also reports bits per byte (text predicted as written)


def model_inputs(batch: dict[str, Tensor], device: torch.device, chunked_loss: str = "off",
                 vocab_size: int = 0) -> dict[str, Tensor | int]:
    """The batch's model inputs (every key but the targets), on ``device``. Where
    ``chunked_loss`` (auto|on|off) chunks this batch's token loss (:func:`loss_chunk`), also its
    token labels and the chunk size: the model then returns the loss summed, not the logits.
    ``chunked_loss`` is not checked here (:func:`check_chunked_loss`, once at start-up)."""
    inputs: dict[str, Tensor | int] = {k: v.to(device, non_blocking=True)
                                       for k, v in batch.items() if k not in LABEL_KEYS}
    labels = batch.get("labels")
    if chunked_loss != "off" and labels is not None and labels.dim() == 2:  # token labels
        chunk = _chunk_rows(chunked_loss, vocab_size, labels.numel())
        if chunk:
            inputs |= {"labels": labels.to(device, non_blocking=True), "loss_chunk": chunk}
    return inputs


def _ce(logits: Tensor, labels: Tensor, reduction: str) -> Tensor:
    """Cross-entropy in fp32 over every position with a label (tokens or rows); ``logits`` may
    be that sum already (a 0-dim tensor: the model's chunked loss), whose mean needs only the
    count of ``labels`` where they are (a host batch's: a 0-dim CPU tensor, used as a scalar
    without a copy to the device)."""
    if logits.dim() == 0:
        return logits if reduction == "sum" else logits / _labelled(labels)
    labels = labels.to(logits.device, non_blocking=True)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE, reduction=reduction)


def training_loss(outputs: Outputs, batch: dict[str, Tensor],
                  reduction: str = "mean") -> tuple[Tensor, dict[str, Tensor]]:
    """The loss to back-propagate (mean over labelled positions, or their sum) and its detached
    parts worth logging separately (MLM + NSP: ``mlm_loss``, ``nsp_loss``)."""
    labels = batch["labels"]  # to the device in _ce, where the logits need them
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
    if not isinstance(outputs, tuple) and outputs.dim() == 0:  # the model's chunked loss
        return {"loss": outputs, "count": _labelled(batch["labels"]).to(device)}
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


def label_bytes(labels: Tensor, byte_lengths: Tensor) -> Tensor:
    """The UTF-8 bytes the labelled tokens spell (``byte_lengths``: ``Tokenizer.byte_lengths``),
    summed: the denominator of bits per byte."""
    return byte_lengths[labels[labels != IGNORE]].sum().float()


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The eval metrics of summed :func:`eval_sums`: ``eval_loss`` (the training loss's
    definition), ``eval_ppl`` for token objectives, accuracies, NSP's parts; ``eval_bpb`` (bits
    per byte: comparable across tokenizers) where the sums hold the labels' ``bytes``."""
    loss = sums["loss"] / sums["count"]
    if "nsp_loss" in sums:
        nsp = sums["nsp_loss"] / max(1.0, sums["nsp_count"])
        return {"eval_loss": loss + nsp, "eval_mlm_loss": loss, "eval_nsp_loss": nsp,
                "eval_nsp_accuracy": sums["nsp_correct"] / max(1.0, sums["nsp_count"])}
    if "correct" in sums:
        return {"eval_loss": loss, "eval_accuracy": sums["correct"] / sums["count"]}
    bpb = {"eval_bpb": sums["loss"] / math.log(2) / sums["bytes"]} if sums.get("bytes") else {}
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50)), **bpb}


def eval_metric_names(objective: str, nsp: bool) -> list[str]:
    """The metrics :func:`eval_metrics` reports for ``objective``: what ``trainer.keep_best`` can
    choose from."""
    if nsp:
        return ["eval_loss", "eval_mlm_loss", "eval_nsp_loss", "eval_nsp_accuracy"]
    if objective == "cls":
        return ["eval_loss", "eval_accuracy"]
    return ["eval_loss", "eval_ppl", *(["eval_bpb"] if objective == BPB_OBJECTIVE else [])]


def _labelled(labels: Tensor) -> Tensor:
    return (labels != IGNORE).sum().float()


def _correct(logits: Tensor, labels: Tensor) -> Tensor:
    return ((logits.argmax(-1) == labels) & (labels != IGNORE)).sum().float()


def _device(outputs: Outputs) -> torch.device:
    return (outputs[0] if isinstance(outputs, tuple) else outputs).device
