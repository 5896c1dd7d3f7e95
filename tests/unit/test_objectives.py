"""Objectives: CLM shift and documents, BERT's 80/10/10 masking, T5's span corruption; and the
stream resumes them exactly (their random draws are tied to the window, not to the run)."""

from __future__ import annotations

from itertools import islice
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatrain.data.manifest import Manifest
from megatrain.data.objectives import (
    IGNORE,
    CausalLM,
    build_objective,
    doc_ids_of,
    raw_length_for,
    span_lengths,
)
from megatrain.data.stream import build_train_stream
from megatrain.errors import ConfigError

EOS, MASK, VOCAB = 2, 6, 1000
SENTINELS = tuple(range(10, 110))
TOKENIZER = SimpleNamespace(unk_id=0, bos_id=1, eos_id=EOS, pad_id=3, cls_id=4, sep_id=5,
                            mask_id=MASK, sentinel_ids=list(SENTINELS), vocab_size=VOCAB,
                            path="tok.model")


def _window(n: int, seed: int = 0) -> np.ndarray:
    """Ordinary tokens (>= 200) with an EOS every ~40 tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(200, VOCAB, n)
    tokens[rng.random(n) < 1 / 40] = EOS
    return tokens


def test_clm_shifts_labels_by_one_and_counts_documents() -> None:
    window = np.arange(2 * 4 + 1)
    batch = CausalLM(4, EOS).batch(window, 2, np.random.default_rng(0))
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert batch["labels"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert "doc_ids" not in batch
    docs = doc_ids_of(np.array([[7, EOS, 8, 9, EOS, EOS, 5]]), EOS)
    assert docs.tolist() == [[0, 0, 1, 1, 1, 2, 3]]  # an EOS ends (belongs to) its document
    with_docs = CausalLM(4, EOS, doc_masking=True).batch(np.array([7, EOS, 8, 9, 1]), 1, None)
    assert with_docs["doc_ids"].tolist() == [[0, 0, 1, 1]]


def test_mlm_masks_15_percent_80_10_10_and_never_specials() -> None:
    mlm = build_objective("mlm", 512, TOKENIZER)
    window = _window(64 * 512)
    batch = mlm.batch(window, 64, np.random.default_rng(1))
    tokens = window.reshape(64, 512)
    inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    chosen = labels != IGNORE
    ordinary = tokens != EOS
    assert not (chosen & ~ordinary).any()  # EOS is never a target
    assert abs(chosen.sum() / ordinary.sum() - 0.15) < 0.005
    assert (labels[chosen] == tokens[chosen]).all()
    masked = (inputs == MASK) & chosen
    kept = (inputs == tokens) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.01
    assert abs(kept.sum() / chosen.sum() - 0.1) < 0.01  # (+0.1 / VOCAB: a random token = itself)
    assert (inputs[~chosen] == tokens[~chosen]).all()
    again = mlm.batch(window, 64, np.random.default_rng(1))
    assert torch.equal(again["input_ids"], batch["input_ids"])


def test_t5_lengths_match_the_paper() -> None:
    # T5's compute_input_and_target_lengths(512, 0.15, 3) -> (568, 114)
    assert raw_length_for(512, 0.15, 3.0) == 568
    noise, spans, inputs = span_lengths(568, 0.15, 3.0)
    assert inputs == 512 and noise + spans + 1 == 114


def _uncorrupt(inputs: list[int], targets: list[int]) -> list[int]:
    """Put the hidden spans back in place of their sentinels."""
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets[:-1]:
        if t in SENTINELS:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t in SENTINELS else [t])
    return out


def test_span_corruption_hides_spans_behind_sentinels() -> None:
    span = build_objective("span", 128, TOKENIZER)
    L = span.row_tokens
    window = _window(8 * L, seed=3)
    batch = span.batch(window, 8, np.random.default_rng(2))
    inputs, dec, labels = batch["input_ids"], batch["decoder_input_ids"], batch["labels"]
    assert inputs.shape == (8, span_lengths(L, 0.15, 3.0)[2]) and 126 <= inputs.shape[1] <= 128
    assert labels.shape == dec.shape == (8, span.target_len)
    assert (dec[:, 0] == TOKENIZER.pad_id).all() and torch.equal(dec[:, 1:], labels[:, :-1])
    assert (inputs[:, -1] == EOS).all() and (labels[:, -1] == EOS).all()
    noise_lengths = []
    for row in range(8):
        assert _uncorrupt(inputs[row].tolist(), labels[row].tolist()) == window[
            row * L:(row + 1) * L].tolist()
        sentinels = [t for t in inputs[row].tolist() if t in SENTINELS]
        assert sentinels == list(SENTINELS[: len(sentinels)])  # in order, from <extra_id_0>
        noise_lengths.append((labels.shape[1] - 1 - len(sentinels)) / len(sentinels))
    assert 2.0 < np.mean(noise_lengths) < 4.0  # mean span length ~3
    other = span.batch(window, 8, np.random.default_rng(3))
    assert not torch.equal(other["input_ids"], inputs)  # the spans are drawn, not fixed


def test_missing_special_tokens_are_config_errors() -> None:
    bare = SimpleNamespace(**{**vars(TOKENIZER), "mask_id": -1, "sentinel_ids": []})
    with pytest.raises(ConfigError, match="needs a \\[MASK\\] token"):
        build_objective("mlm", 64, bare)
    with pytest.raises(ConfigError, match="needs T5 sentinels"):
        build_objective("span", 64, bare)
    with pytest.raises(ConfigError, match="valid: clm, mlm, span"):
        build_objective("prefix", 64, TOKENIZER)


@pytest.mark.parametrize("name", ["mlm", "span"])
def test_stream_resumes_random_objectives_exactly(prepared: Manifest, name: str) -> None:
    tokenizer = SimpleNamespace(**{**vars(TOKENIZER), "eos_id": prepared.eos_id})
    objective = build_objective(name, 32, tokenizer)

    def stream():
        return build_train_stream(prepared, seq_len=32, micro_batch_size=2, seed=7, rank=0,
                                  world_size=1, num_workers=0, objective=objective)

    straight = list(islice(iter(stream()), 6))
    first = stream()
    head = list(islice(iter(first), 3))
    resumed = stream()
    resumed.load_state_dict(first.state_dict())
    tail = list(islice(iter(resumed), 3))
    for a, b in zip(straight, head + tail, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(straight[0]["input_ids"], straight[1]["input_ids"])
