"""The chunked loss (megatrain.models.common.chunked_ce, trainer.chunked_loss): the same loss and
gradients as cross-entropy over the whole logits, for the bare function and through every
family's real forward and backward with every token objective; the policy; the planner."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatrain.data.stream.objectives import build_objective
from megatrain.data.stream.targets import IGNORE
from megatrain.errors import ConfigError
from megatrain.models.bert.model import Bert, BertConfig
from megatrain.models.common import chunked_ce
from megatrain.models.common.chunked_ce import LMHead, linear_cross_entropy
from megatrain.models.gpt2.model import GPT, GPTConfig
from megatrain.models.llama.model import Llama, LlamaConfig
from megatrain.models.t5.model import T5, T5Config
from megatrain.training import losses
from megatrain.training.losses import (
    AUTO_MIN_LOGITS,
    eval_sums,
    loss_chunk,
    model_inputs,
    training_loss,
)
from megatrain.training.memory_plan import activation_bytes, loss_bytes, plan_memory

VOCAB, SEQ, ROWS, CHUNK = 300, 24, 3, 7  # 72 tokens: chunks of 7 do not divide them
TOKENIZER = SimpleNamespace(unk_id=0, bos_id=1, eos_id=2, pad_id=3, cls_id=4, sep_id=5,
                            mask_id=6, sentinel_ids=list(range(200, 300)), vocab_size=VOCAB,
                            path="tok.model")
CPU = torch.device("cpu")


def _reference(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
               b: torch.Tensor | None = None) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w, b).float(), labels, ignore_index=IGNORE,
                           reduction="sum")


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def _leaves(n: int, c: int, v: int, dtype: torch.dtype = torch.float32
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
                 for shape in ((n, c), (v, c), (v,)))


def test_ignore_index_is_the_labels() -> None:
    assert chunked_ce.IGNORE == IGNORE


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 7, 37, 1000])
def test_same_loss_and_gradients_as_full_cross_entropy(chunk: int, bias: bool) -> None:
    h, w, b = _leaves(37, 16, 50)
    labels = torch.randint(0, 50, (37,), generator=torch.Generator().manual_seed(1))
    labels[::4] = IGNORE
    labels[7:14] = IGNORE  # a whole chunk of 7 without a label
    bias_t = b if bias else None
    leaves = [h, w] + ([b] if bias else [])
    ref = _reference(h, w, labels, bias_t)
    out = linear_cross_entropy(h, w, labels, bias_t, chunk=chunk)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-4)
    for got, want in zip(_grads(out * 1.7, leaves), _grads(ref * 1.7, leaves), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradcheck_in_float64() -> None:
    h, w, b = _leaves(11, 4, 9, torch.float64)
    labels = torch.tensor([0, 3, IGNORE, 8, 1, IGNORE, IGNORE, 2, 5, 4, 7])
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_cross_entropy(h, w, labels, b, chunk=3), (h, w, b))


def test_no_label_at_all_gives_zero_and_zero_gradients() -> None:
    h, w, b = _leaves(9, 4, 10)
    out = linear_cross_entropy(h, w, torch.full((9,), IGNORE), b, chunk=4)
    assert out.item() == 0.0
    assert all(g.abs().sum() == 0 for g in _grads(out, [h, w, b]))


def test_bad_chunk_is_refused() -> None:
    h, w, _ = _leaves(3, 4, 5)
    with pytest.raises(ValueError, match="chunk=0"):
        linear_cross_entropy(h, w, torch.zeros(3, dtype=torch.long), chunk=0)


def test_lm_head_without_labels_is_the_linear_layer() -> None:
    head = LMHead(8, 20, bias=True)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(head(x), F.linear(x, head.weight, head.bias), rtol=0, atol=0)
    assert set(head.state_dict()) == {"weight", "bias"}


def test_bf16_autocast_computes_in_bf16_and_returns_fp32_leaves_their_grads() -> None:
    h, w, _ = _leaves(40, 32, 64)
    labels = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(2))
    labels[:9] = IGNORE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=IGNORE,
                              reduction="sum")
        out = linear_cross_entropy(h, w, labels, chunk=6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=1e-2)
    got, want = _grads(out, [h, w]), _grads(ref, [h, w])
    for g, r, leaf in zip(got, want, (h, w), strict=True):
        assert g.dtype == leaf.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)


def test_bf16_weights_give_bf16_gradients_close_to_the_full_loss() -> None:
    h, w, _ = _leaves(40, 32, 64, torch.bfloat16)
    labels = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(3))
    ref, out = _reference(h, w, labels), linear_cross_entropy(h, w, labels, chunk=9)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=1e-2)
    for g, r in zip(_grads(out, [h, w]), _grads(ref, [h, w]), strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2)


# --- every family through its real forward and backward -----------------------------------------


def _window(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(7, 200, n)
    tokens[rng.random(n) < 1 / 10] = TOKENIZER.eos_id
    return tokens


def _objective_batch(name: str, **kw: object) -> dict[str, torch.Tensor]:
    objective = build_objective(name, SEQ, TOKENIZER, **kw)
    size = getattr(objective, "row_tokens", SEQ) * ROWS + 1
    return objective.batch(_window(size, seed=len(name)), ROWS, np.random.default_rng(0))


def _sft_batch() -> dict[str, torch.Tensor]:
    """A causal batch whose prompts and padding are -100, one row padded from the middle, so
    some chunks of 7 have no label at all."""
    batch = _objective_batch("clm")
    labels, mask = batch["labels"].clone(), torch.ones(ROWS, SEQ, dtype=torch.long)
    labels[:, :9] = IGNORE  # prompts
    labels[1, 15:] = IGNORE  # padding
    mask[1, 16:] = 0
    return {**batch, "labels": labels, "attention_mask": mask}


def _dims(**kw: object) -> dict[str, object]:
    return dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=VOCAB, max_seq_len=64,
                **kw)


CASES = {
    "gpt-clm": (lambda: GPT(GPTConfig(**_dims())), lambda: _objective_batch("clm")),
    "gpt-sft": (lambda: GPT(GPTConfig(**_dims())), _sft_batch),
    "llama-untied-clm": (lambda: Llama(LlamaConfig(**_dims(n_kv_heads=2))),
                         lambda: _objective_batch("clm", doc_masking=True)),
    "llama-tied-sft": (lambda: Llama(LlamaConfig(**_dims(tie_embeddings=True))), _sft_batch),
    "bert-mlm": (lambda: Bert(BertConfig(**_dims())), lambda: _objective_batch("mlm")),
    "bert-mlm-nsp": (lambda: Bert(BertConfig(**_dims(nsp=True))),
                     lambda: _objective_batch("mlm", nsp="next")),
    "t5-span": (lambda: T5(T5Config(**_dims())), lambda: _objective_batch("span")),
    "t5-tied-span": (lambda: T5(T5Config(**_dims(tie_embeddings=True))),
                     lambda: _objective_batch("span")),
}


def _step(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunked: str,
          reduction: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = training_loss(model(**model_inputs(batch, CPU, chunked, VOCAB)), batch,
                            reduction)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_family_and_objective_same_loss_and_every_gradient(
        case: str, reduction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(losses, "CHUNK_LOGITS", CHUNK * VOCAB)  # "on": chunks of 7 rows
    torch.manual_seed(0)
    make_model, make_batch = CASES[case]
    model, batch = make_model(), make_batch()
    chunked_inputs = model_inputs(batch, CPU, "on", VOCAB)
    assert chunked_inputs["loss_chunk"] == CHUNK
    assert (batch["labels"] != IGNORE).any()
    full_loss, full_grads = _step(model, batch, "off", reduction)
    loss, grads = _step(model, batch, "on", reduction)
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == full_grads.keys()
    for name, want in full_grads.items():  # fp32 sums in another order: errors at its scale
        torch.testing.assert_close(grads[name], want, rtol=1e-4,
                                   atol=1e-4 * float(want.abs().max()) + 1e-8,
                                   msg=lambda m, name=name: f"{case} {name}: {m}")
    with torch.no_grad():
        full, chunked = (eval_sums(model(**model_inputs(batch, CPU, s, VOCAB)), batch)
                         for s in ("off", "on"))
    assert full.keys() == chunked.keys()
    for name in full:
        torch.testing.assert_close(chunked[name], full[name], rtol=1e-5, atol=1e-5)


def test_generation_and_classification_keep_their_logits() -> None:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**_dims()))
    assert gpt(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, VOCAB)
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.tensor([0, 1])}
    assert "loss_chunk" not in model_inputs(batch, CPU, "on", VOCAB)  # class labels
    classifier = Bert(BertConfig(**_dims(num_labels=2)))
    assert classifier(**model_inputs(batch, CPU, "on", VOCAB)).shape == (2, 2)


# --- the policy and the planner -------------------------------------------------------------


def test_the_policy_chunks_where_the_logits_are_large() -> None:
    big = AUTO_MIN_LOGITS // 128256 + 1  # tokens of a 128k vocabulary past the threshold
    assert loss_chunk("off", 128256, 10 * big) == 0
    assert loss_chunk("auto", 128256, big - 2) == 0
    assert loss_chunk("auto", 128256, big) == losses.CHUNK_LOGITS // 128256 == 261
    assert loss_chunk("on", 4096, 100) == 100  # never more rows than the tokens
    assert loss_chunk("auto", 4096, 8 * 256) == 0  # the quickstart's logits: whole
    with pytest.raises(ConfigError, match="trainer.chunked_loss='yes' is not one of"):
        loss_chunk("yes", 100, 100)
    assert "labels" not in model_inputs({"input_ids": torch.zeros(1, 2, dtype=torch.long),
                                         "labels": torch.zeros(1, 2, dtype=torch.long)},
                                        CPU, "auto", 100)


LLAMA = LlamaConfig(n_layers=2, d_model=512, n_heads=8, d_ff=1376, vocab_size=128256,
                    max_seq_len=2048)


# The planner's loss figures for LLAMA, 4 x 2048 = 8192 tokens, written out by hand:
# whole logits: 8192 tokens x 128256 vocab = 1_050_673_152 logits, at b (the logits) + 12 bytes
# of fp32 cross-entropy each: fp32 16 B -> 16_810_770_432, bf16 14 B -> 14_709_424_128.
# chunked (auto): 2^25 // 128256 = 261 rows, 261 x 128256 = 33_474_816 logits at the same
# bytes, plus one fp32 log-sum-exp per token (4 x 8192 = 32_768); in bf16 also the fp32
# accumulator of the head weight's gradient and one chunk's bf16 part of it, 128256 x 512 =
# 65_667_072 elements x (4 + 2) B = 394_002_432.
#   fp32: 33_474_816 x 16 + 32_768 = 535_629_824
#   bf16: 33_474_816 x 14 + 32_768 + 394_002_432 = 862_682_624
PLANNED = {"fp32": (16_810_770_432, 535_629_824), "bf16": (14_709_424_128, 862_682_624)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_planner_counts_one_chunk_of_logits(precision: str) -> None:
    kw = {"precision": precision, "micro_batch_size": 4, "seq_len": 2048}
    full = activation_bytes(LLAMA, "llama", chunked_loss="off", **kw)
    auto = activation_bytes(LLAMA, "llama", chunked_loss="auto", **kw)
    rows = 261
    assert (full.loss, auto.loss) == PLANNED[precision]
    assert full.loss_chunk == 0 and auto.loss_chunk == rows
    assert auto.loss < full.loss / 10
    assert (auto.blocks, auto.head) == (full.blocks, full.head)
    plan = plan_memory(LLAMA, "llama", zero_stage=0, offload_optimizer=False,
                       offload_param=False, world_size=1, activation_checkpointing=False,
                       vocab_size=LLAMA.vocab_size, **kw)
    assert any(f"({rows} rows at a time)" in item.what for item in plan.items)


def _peak_bytes(head: LMHead, x: torch.Tensor, labels: torch.Tensor, rows: int) -> int:
    """The most bytes torch's CPU allocator held at once, above what existed before, over one
    forward + backward of the head and the loss (the trainer's path: whole logits through
    training_loss, or the chunked loss ``rows`` at a time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = head(x, labels, rows) if rows else head(x)
        training_loss(out, {"labels": labels}, "sum")[0].backward()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:  # nbytes: + an allocation, - a free
        held += event.nbytes()
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_planners_loss_bytes_bound_what_the_loss_allocates(dtype: torch.dtype) -> None:
    """memory_plan.loss_bytes against the bytes the loss really allocates (less the head
    weight's and the hidden states' gradients, which the planner counts elsewhere): the whole
    logits' peak about as planned; a chunked loss's peak within the planned figure (at most
    2.5 times less), and set by the chunk's rows, not by the tokens."""
    vocab, d, rows, b = 4096, 256, 128, torch.finfo(dtype).bits // 8
    head = LMHead(d, vocab, bias=False).to(dtype)
    measured = {}
    for tokens in (1024, 2048):
        x = torch.randn(1, tokens, d, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
        gradients = (vocab + tokens) * d * b
        for chunk in (0, rows):
            measured[tokens, chunk] = _peak_bytes(head, x, labels, chunk) - gradients
            head.weight.grad = None
    for tokens in (1024, 2048):
        full = loss_bytes(vocab, d, tokens, b)
        assert 0.9 * full <= measured[tokens, 0] <= full, (tokens, measured)
        chunked = loss_bytes(vocab, d, tokens, b, rows)
        assert chunked / 2.5 <= measured[tokens, rows] <= chunked, (tokens, measured)
    # twice the tokens: twice the whole logits, the same chunk (+ a log-sum-exp per token)
    assert measured[2048, 0] > 1.9 * measured[1024, 0]
    assert measured[2048, rows] - measured[1024, rows] < 0.05 * measured[1024, rows]
