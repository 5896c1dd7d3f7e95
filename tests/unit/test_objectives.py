"""Objectives: CLM shift and documents, BERT's 80/10/10 masking (token by token, or whole words on
real tokenizations), T5's span corruption; and the stream resumes them exactly (their random draws
are tied to the window, not to the run)."""

from __future__ import annotations

import dataclasses
import hashlib
from itertools import islice
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from megatrain.data.manifest import Manifest
from megatrain.data.prepare.train_tokenizer import train_tokenizer
from megatrain.data.stream.objectives import (
    IGNORE,
    CausalLM,
    MaskedLM,
    build_objective,
    doc_ids_of,
    raw_length_for,
    span_lengths,
)
from megatrain.data.stream.packing import Window
from megatrain.data.stream.train_stream import build_train_stream, window_batch
from megatrain.data.tokenizer import WORD_END, WORD_START, Tokenizer, load_tokenizer
from megatrain.errors import ConfigError

EOS, MASK, VOCAB = 2, 6, 1000
SENTINELS = tuple(range(10, 110))
TOKENIZER = SimpleNamespace(unk_id=0, bos_id=1, eos_id=EOS, pad_id=3, cls_id=4, sep_id=5,
                            mask_id=MASK, sentinel_ids=list(SENTINELS), vocab_size=VOCAB,
                            path="tok.model")


def _resumes_exactly(stream: Any) -> list[dict[str, torch.Tensor]]:
    """6 batches of ``stream()`` straight through, checked against 3, a save, a fresh stream
    loading it, and 3 more."""
    straight = list(islice(iter(stream()), 6))
    first = stream()
    head = list(islice(iter(first), 3))
    resumed = stream()
    resumed.load_state_dict(first.state_dict())
    tail = list(islice(iter(resumed), 3))
    for a, b in zip(straight, head + tail, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return straight


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


@pytest.mark.parametrize("name", ["mlm", "mlm-wwm", "span"])
def test_stream_resumes_random_objectives_exactly(prepared: Manifest, name: str) -> None:
    if name == "mlm-wwm":  # whole words need the corpus' real tokenizer
        objective = build_objective("mlm", 32, load_tokenizer(prepared.tokenizer_path),
                                    whole_word_masking=True)
    else:
        tokenizer = SimpleNamespace(**{**vars(TOKENIZER), "eos_id": prepared.eos_id})
        objective = build_objective(name, 32, tokenizer)

    def stream():
        return build_train_stream(prepared, seq_len=32, micro_batch_size=2, seed=7, rank=0,
                                  world_size=1, num_workers=0, objective=objective)

    straight = _resumes_exactly(stream)
    assert not torch.equal(straight[0]["input_ids"], straight[1]["input_ids"])


# --- whole-word masking on real tokenizations -----------------------------------------------------

UNICODE_LINES = ("naïve café — 東京 🐍", "Ærøskøbing, Zürich: façade.", "Привет, мир!",
                 "数据 と データ\t(tab)", "x🙂y 🐍🐍 «quoted»")


@pytest.fixture(scope="module")
def wwm_text(shakespeare_text: str) -> str:
    """Shakespeare with a line of multi-byte words after every 7th line (byte-fallback pieces)."""
    lines = []
    for i, line in enumerate(shakespeare_text.splitlines()):
        lines.append(line)
        if i % 7 == 6:
            lines.append(UNICODE_LINES[i // 7 % len(UNICODE_LINES)])
    return "\n".join(lines)


@pytest.fixture(scope="module", params=["bpe", "unigram", "char"])
def wwm_tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  shakespeare_text: str) -> Tokenizer:
    """A 512-piece tokenizer of each type trained on (ASCII) Shakespeare alone: the multi-byte
    characters of the lines in between fall back to their UTF-8 bytes."""
    model = tmp_path_factory.mktemp("wwm") / f"{request.param}.model"
    return load_tokenizer(train_tokenizer([shakespeare_text], model, 512,
                                          model_type=request.param))


@pytest.fixture(scope="module")
def wwm_stream(wwm_tokenizer: Tokenizer, wwm_text: str) -> np.ndarray:
    """The text's paragraphs as documents, each followed by EOS, as the stream packs them."""
    docs = wwm_tokenizer.encode_batch(wwm_text.split("\n\n"))
    return np.concatenate([np.append(d, wwm_tokenizer.eos_id) for d in docs]).astype(np.int64)


def _word_starts(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Reference rule, token by token: a piece starts a word when its table says so, when the
    piece before ends one, or when it is the first."""
    return np.array([i == 0 or bool(table[t] & WORD_START) or bool(table[ids[i - 1]] & WORD_END)
                     for i, t in enumerate(ids)])


def _split_words(ids: np.ndarray, starts: np.ndarray) -> list[np.ndarray]:
    return np.split(ids, np.flatnonzero(starts)[1:])


def _is_continuation_byte(tokenizer: Tokenizer, token: int) -> bool:
    piece = tokenizer._sp.id_to_piece(int(token))
    return tokenizer._sp.is_byte(int(token)) and 0x80 <= int(piece[3:5], 16) < 0xC0


def test_word_table_splits_real_text_into_its_whitespace_words(wwm_tokenizer: Tokenizer,
                                                               wwm_text: str) -> None:
    tok = wwm_tokenizer
    table = tok.word_table()
    assert table.shape == (tok.vocab_size,) and table.dtype == np.uint8
    sample = wwm_text[:20_000]
    ids = np.asarray(tok.encode(sample))
    starts = _word_starts(table, ids)
    words = [tok.decode(w) for w in _split_words(ids, starts)]
    # Every word decodes on its own (no character's bytes split between two words) and is
    # whitespace alone ("\n", a tab, spaces) or one whitespace-separated word of the text, with
    # at most the one leading space of a "▁" piece.
    assert "".join(words) == sample
    assert [w.strip() for w in words if w.strip()] == sample.split()
    assert all(w.isspace() or w.removeprefix(" ") == w.strip() for w in words)
    assert not any(_is_continuation_byte(tok, t) for t in ids[starts])
    assert sum(_is_continuation_byte(tok, t) for t in ids) > 500  # byte fallback was exercised
    for special in (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.cls_id, tok.sep_id,
                    tok.mask_id, *tok.sentinel_ids):
        assert table[special] == WORD_START | WORD_END


def _chosen_of(objective: MaskedLM, window: np.ndarray, rows: int, seed: int):
    batch = objective.batch(window, rows, np.random.default_rng(seed))
    tokens = window[: rows * objective.seq_len].reshape(rows, objective.seq_len)
    return tokens, batch["input_ids"].numpy(), batch["labels"].numpy()


def test_whole_word_masking_chooses_whole_words_and_never_specials(
        wwm_tokenizer: Tokenizer, wwm_stream: np.ndarray) -> None:
    tok, T, rows = wwm_tokenizer, 128, 64
    mlm = build_objective("mlm", T, tok, whole_word_masking=True)
    specials = np.array([tok.unk_id, tok.bos_id, tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id])
    table = tok.word_table()
    words_seen = 0
    for k in range(4):
        window = wwm_stream[k * rows * T:(k + 1) * rows * T].copy()
        rng = np.random.default_rng(k)  # specials strewn in, as padding and BERT's pairs bring
        strewn = rng.random(window.size) < 0.02
        window[strewn] = rng.choice(specials, strewn.sum())
        tokens, inputs, labels = _chosen_of(mlm, window, rows, seed=k)
        chosen = labels != IGNORE
        assert not (chosen & np.isin(tokens, [*specials, tok.eos_id])).any()
        assert (labels[chosen] == tokens[chosen]).all()
        assert (inputs[~chosen] == tokens[~chosen]).all()
        for r in range(rows):
            starts = _word_starts(table, tokens[r])
            for word in _split_words(np.arange(T), starts):
                assert chosen[r, word].all() or not chosen[r, word].any(), tokens[r, word]
                words_seen += chosen[r, word].all() and len(word) > 1
            inside = starts.copy()  # word starts a character's bytes could straddle
            inside[0] = False  # (not a row's start, nor after a special strewn in here)
            inside[1:] &= ~np.isin(tokens[r, :-1], specials)
            assert not any(_is_continuation_byte(tok, t) for t in tokens[r][inside])
    assert words_seen > 500  # many words of several pieces were chosen, wholly


@pytest.mark.parametrize("mask_prob", [0.15, 0.4])
def test_whole_word_masking_fraction_and_80_10_10(wwm_tokenizer: Tokenizer,
                                                  wwm_stream: np.ndarray, mask_prob: float) -> None:
    tok, T, rows = wwm_tokenizer, 128, 64
    mlm = build_objective("mlm", T, tok, mask_prob=mask_prob, whole_word_masking=True)
    chosen_n = ordinary_n = masked_n = kept_n = random_n = 0
    for k in range(len(wwm_stream) // (rows * T)):
        tokens, inputs, labels = _chosen_of(mlm, wwm_stream[k * rows * T:], rows, seed=k)
        chosen, ordinary = labels != IGNORE, tokens != tok.eos_id
        budget = np.rint(mask_prob * ordinary.sum(1))
        assert (chosen.sum(1) <= budget).all()  # whole words never overflow a row's budget
        assert (chosen.sum(1) >= budget - 1).mean() > 0.95  # and nearly always fill it
        chosen_n, ordinary_n = chosen_n + chosen.sum(), ordinary_n + ordinary.sum()
        masked_n += (chosen & (inputs == tok.mask_id)).sum()
        kept_n += (chosen & (inputs == tokens)).sum()
        random_n += (chosen & (inputs != tokens) & (inputs != tok.mask_id)).sum()
    assert chosen_n > 30_000
    assert abs(chosen_n / ordinary_n - mask_prob) < 0.005
    assert abs(masked_n / chosen_n - 0.8) < 0.01
    assert abs(kept_n / chosen_n - 0.1) < 0.01  # (+0.1 / vocab: a random token = itself)
    assert abs(random_n / chosen_n - 0.1) < 0.01


def test_whole_word_masking_is_seeded_by_the_window_position(wwm_tokenizer: Tokenizer,
                                                             wwm_stream: np.ndarray) -> None:
    mlm = build_objective("mlm", 128, wwm_tokenizer, whole_word_masking=True)

    def batch(start: tuple[int, int, int, int]) -> dict[str, torch.Tensor]:
        window = Window(wwm_stream[: 8 * 128].copy(), 8, start, [], [])
        return window_batch(window, mlm, seed=7)

    first, again = batch((0, 1, 40, 3)), batch((0, 1, 40, 3))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    for other in ((0, 1, 41, 3), (0, 2, 40, 3), (0, 1, 40, 4)):
        assert not torch.equal(batch(other)["labels"], first["labels"])


def test_specials_stand_alone_whatever_the_word_table() -> None:
    """A table that marks no word starts at all (each row one word) still ends words at the
    specials, and never chooses them: the words are the runs between EOS."""
    table = np.zeros(VOCAB, dtype=np.uint8)
    tokenizer = SimpleNamespace(**vars(TOKENIZER), word_table=lambda: table)
    with pytest.raises(ConfigError, match="no piece of .* starts a word"):  # refused when built
        build_objective("mlm", 128, tokenizer, whole_word_masking=True)
    mlm = dataclasses.replace(build_objective("mlm", 128, TOKENIZER, mask_prob=0.9),
                              word_table=table)
    tokens, _, labels = _chosen_of(mlm, _window(32 * 128, seed=5), 32, seed=0)
    chosen = labels != IGNORE
    assert chosen.any() and not (chosen & (tokens == EOS)).any()
    for r in range(32):
        runs = np.split(np.arange(128), np.flatnonzero(tokens[r] == EOS))
        for run in runs:  # each run: an EOS (the first excepted) then a word
            word = run[1:] if tokens[r, run[0]] == EOS else run
            assert chosen[r, word].all() or not chosen[r, word].any()


# The token-level batch before whole-word masking existed: sha256 of this test's batch, taken from
# the code as it was (a numpy whose Generator streams changed would change it too).
TOKEN_LEVEL_DIGEST = "11f8b2502515982c4aabf51f439a0d12dcb2e441e3de42127974994104455a24"


def _token_level_reference(tokens: np.ndarray, rng: np.random.Generator, mask_prob: float,
                           specials: tuple[int, ...], mask_id: int, vocab: int):
    """Token-level MLM as it was written before whole-word masking."""
    chosen = (rng.random(tokens.shape) < mask_prob) & ~np.isin(tokens, specials)
    action = rng.random(tokens.shape)
    inputs = np.where(chosen & (action < 0.8), mask_id, tokens)
    randomize = chosen & (action >= 0.8) & (action < 0.9)
    inputs = np.where(randomize, rng.integers(0, vocab, tokens.shape), inputs)
    return inputs, np.where(chosen, tokens, IGNORE)


def test_token_level_mlm_is_unchanged_without_whole_words(wwm_tokenizer: Tokenizer,
                                                          wwm_stream: np.ndarray) -> None:
    mlm = build_objective("mlm", 128, TOKENIZER, doc_masking=True, whole_word_masking=False)
    assert mlm.word_table is None
    batch = mlm.batch(_window(8 * 128), 8, np.random.default_rng(1))
    digest = hashlib.sha256()
    for key in sorted(batch):
        digest.update(key.encode())
        digest.update(batch[key].numpy().tobytes())
    assert digest.hexdigest() == TOKEN_LEVEL_DIGEST
    real = build_objective("mlm", 128, wwm_tokenizer)
    for seed in range(3):
        inputs, labels = _token_level_reference(
            wwm_stream[: 16 * 128].reshape(16, 128), np.random.default_rng(seed), 0.15,
            real.special_ids, wwm_tokenizer.mask_id, wwm_tokenizer.vocab_size)
        got = real.batch(wwm_stream, 16, np.random.default_rng(seed))
        assert (got["input_ids"].numpy() == inputs).all()
        assert (got["labels"].numpy() == labels).all()


def test_whole_word_masking_is_mlm_only_and_read_from_the_config(tokenizer_model: Path) -> None:
    from hydra import compose, initialize_config_module

    from megatrain.config import register_configs
    from megatrain.models.registry import get_model_spec
    from megatrain.training.trainer import Trainer

    for name in ("clm", "span"):
        with pytest.raises(ConfigError, match="whole_word_masking applies to data.objective=mlm"):
            build_objective(name, 64, TOKENIZER, whole_word_masking=True)
    with pytest.raises(ConfigError, match="cannot tell words apart"):
        build_objective("mlm", 64, TOKENIZER, whole_word_masking=True)

    def objective(*overrides: str):
        register_configs()
        with initialize_config_module("megatrain.configs", version_base=None):
            cfg = compose("config", overrides=list(overrides))
        spec = get_model_spec(cfg.model.family)
        trainer = SimpleNamespace(cfg=cfg, spec=spec, task=cfg.data.objective or spec.objective,
                                  tokenizer=load_tokenizer(tokenizer_model), _num_labels=lambda: 0)
        return Trainer._build_objective(trainer)

    assert objective("model=bert-tiny").word_table is None  # off by default
    wwm = objective("model=bert-tiny", "data.whole_word_masking=true")
    assert isinstance(wwm, MaskedLM) and wwm.word_table is not None
    with pytest.raises(ConfigError, match="whole_word_masking applies to data.objective=mlm"):
        objective("model=gpt2-tiny", "data.whole_word_masking=true")


def test_hugging_face_word_tables(wwm_text: str, tmp_path: Path) -> None:
    """A converted megatrain tokenizer has the SentencePiece table; a byte-level (GPT-2 ``Ġ``)
    tokenizer splits text at its whitespace; a WordPiece one at its pre-tokenizer's words."""
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from megatrain.data.tokenizer.convert_to_hf import save_hf_tokenizer

    sp = load_tokenizer(train_tokenizer([wwm_text], tmp_path / "sp.model", 512))
    (tmp_path / "converted").mkdir()
    save_hf_tokenizer(sp.path, tmp_path / "converted")
    converted = load_tokenizer(tmp_path / "converted" / "tokenizer.json")
    assert type(converted) is not Tokenizer
    assert np.array_equal(converted.word_table(), sp.word_table())

    sample = wwm_text[:20_000]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator([wwm_text], tokenizers.trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<mask>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(tmp_path / "byte_level.json"))
    tok = load_tokenizer(tmp_path / "byte_level.json")
    table = tok.word_table()
    assert table[tok.eos_id] == table[tok.mask_id] == WORD_START | WORD_END
    ids = np.asarray(tok.encode(sample))
    words = [tok.decode(w) for w in _split_words(ids, _word_starts(table, ids))]
    assert "".join(words) == sample
    assert [w.strip() for w in words if w.strip()] == sample.split()

    wordpiece = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = tokenizers.normalizers.BertNormalizer()
    wordpiece.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator([wwm_text], tokenizers.trainers.WordPieceTrainer(
        vocab_size=2000, show_progress=False,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    wordpiece.save(str(tmp_path / "wordpiece.json"))
    tok = load_tokenizer(tmp_path / "wordpiece.json")
    encoding = wordpiece.encode(sample)
    ids = np.asarray(encoding.ids)
    starts = _word_starts(tok.word_table(), ids)
    assert (np.asarray(encoding.word_ids)[starts] == np.arange(starts.sum())).all()
    assert len(set(encoding.word_ids)) == starts.sum()


def test_a_batch_without_candidate_words_masks_nothing() -> None:
    """Rows of specials only (or no rows): nothing to choose, and no error."""
    table = np.full(VOCAB, WORD_START, dtype=np.uint8)
    tokenizer = SimpleNamespace(**vars(TOKENIZER), word_table=lambda: table)
    mlm = build_objective("mlm", 16, tokenizer, whole_word_masking=True)
    only_eos = np.full(2 * 16, EOS, dtype=np.int64)
    labels = mlm.batch(only_eos, 2, np.random.default_rng(0))["labels"]
    assert (labels == IGNORE).all()
    assert mlm.batch(only_eos[:0], 0, np.random.default_rng(0))["labels"].numel() == 0


def test_a_tokenizer_whose_pieces_carry_no_spaces_is_refused(wwm_text: str,
                                                              tmp_path: Path) -> None:
    """BPE behind a ``Whitespace`` pre-tokenizer drops the spaces: no piece says where a word
    starts, so whole-word masking would find one word per row and mask nothing."""
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    bpe.train_from_iterator([wwm_text[:20_000]], tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>", "[MASK]"], show_progress=False))
    bpe.save(str(tmp_path / "whitespace.json"))
    tok = load_tokenizer(tmp_path / "whitespace.json")
    with pytest.raises(ConfigError, match="do not mark word boundaries"):
        build_objective("mlm", 64, tok, whole_word_masking=True)
    build_objective("mlm", 64, tok)  # token-level masking is fine


# --- sentence pairs: BERT's next-sentence and sentence-order prediction (data.nsp) ----------------

CLS, SEP = TOKENIZER.cls_id, TOKENIZER.sep_id


def _pairs(mode: str, window: np.ndarray, rows: int, seed: int = 0, seq_len: int = 32):
    """(batch, the rows' originals: masked tokens put back) of ``data.nsp=mode``."""
    batch = build_objective("mlm", seq_len, TOKENIZER, nsp=mode).batch(
        window, rows, np.random.default_rng(seed))
    labels, inputs = batch["labels"].numpy(), batch["input_ids"].numpy()
    return batch, np.where(labels != IGNORE, labels, inputs)


def _segments(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of ``[CLS] A [SEP] B [SEP]``."""
    first_sep = int(np.flatnonzero(row == SEP)[0])
    return row[1:first_sep], row[first_sep + 1:-1]


@pytest.mark.parametrize("mode", ["next", "order"])
def test_sentence_pairs_are_cls_a_sep_b_sep_masked_on_a_and_b_only(mode: str) -> None:
    rows, n = 256, 32 - 3
    window = _window(rows * n)
    batch, original = _pairs(mode, window, rows)
    assert set(batch) == {"input_ids", "token_type_ids", "labels", "nsp_labels"}
    assert all(v.dtype == torch.int64 for v in batch.values())
    inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    types = batch["token_type_ids"].numpy()
    assert inputs.shape == types.shape == labels.shape == (rows, 32)
    assert batch["nsp_labels"].shape == (rows,)
    assert (original[:, 0] == CLS).all() and (original[:, -1] == SEP).all()
    assert ((original == SEP).sum(1) == 2).all() and ((original == CLS).sum(1) == 1).all()
    first_sep = (original == SEP).argmax(1)
    assert (first_sep >= 2).all() and (first_sep <= 32 - 3).all()  # A and B never empty
    assert (types == (np.arange(32) > first_sep[:, None])).all()  # 0: [CLS] A [SEP]; 1: B [SEP]
    special = (original == CLS) | (original == SEP) | (original == EOS)
    assert not (labels[special] != IGNORE).any()  # [CLS], [SEP] (and EOS) are never targets
    assert (inputs[special] == original[special]).all()
    chosen = labels != IGNORE
    assert abs(chosen.sum() / (~special).sum() - 0.15) < 0.02
    assert abs(((inputs == MASK) & chosen).sum() / chosen.sum() - 0.8) < 0.04
    for r in range(rows):  # A is the start of the row's own stream tokens
        a, b = _segments(original[r])
        own = window[r * n:(r + 1) * n]
        swapped = mode == "order" and batch["nsp_labels"][r] == 1
        if swapped:
            assert np.array_equal(np.concatenate([b, a]), own)
        else:
            assert np.array_equal(a, own[:len(a)])
            if batch["nsp_labels"][r] == 0:
                assert np.array_equal(b, own[len(a):])  # B is the text that follows A


@pytest.mark.parametrize("mode", ["next", "order"])
def test_half_the_pairs_are_random_or_swapped(mode: str) -> None:
    rows = 2000
    batch, _ = _pairs(mode, _window(rows * 29, seed=1), rows, seed=2)
    assert abs(batch["nsp_labels"].float().mean().item() - 0.5) < 0.03


def test_a_random_b_comes_from_another_document_of_the_window() -> None:
    rows, n = 64, 29
    window = _window(rows * n, seed=3)
    docs = doc_ids_of(window[None], EOS)[0]
    batch, original = _pairs("next", window, rows, seed=4)
    random_rows = np.flatnonzero(batch["nsp_labels"].numpy() == 1)
    assert len(random_rows) > 20
    elsewhere = 0
    for r in random_rows:
        a, b = _segments(original[r])
        a_docs = set(docs[r * n:r * n + len(a)])
        spans = np.lib.stride_tricks.sliding_window_view(window, len(b))
        starts = np.flatnonzero((spans == b).all(1))
        assert len(starts), "B is a span of the window"
        assert any(not a_docs & set(docs[s:s + len(b)]) for s in starts)
        elsewhere += all(s // n != r for s in starts)
    assert elsewhere > len(random_rows) // 2  # mostly from other rows, not the row's own tail


def test_in_a_window_of_one_document_a_random_b_is_from_the_other_rows() -> None:
    """No other document in the window (documented): B is text of the other rows, neither A nor
    what follows it; a window of one row in one document has no random B at all."""
    rows, n = 256, 29
    window = np.arange(1000, 1000 + rows * n)  # one document, every token distinct
    batch, original = _pairs("next", window, rows, seed=8)
    labels = batch["nsp_labels"].numpy()
    assert abs(labels.mean() - 0.5) < 0.1
    for r in np.flatnonzero(labels == 1):
        b = _segments(original[r])[1]
        start = int(b[0]) - 1000
        assert np.array_equal(b, window[start:start + len(b)])
        assert start + len(b) <= r * n or start >= (r + 1) * n  # not in its own row
    assert (_pairs("next", window[:n], 1)[0]["nsp_labels"] == 0).all()


@pytest.mark.parametrize("mode", ["next", "order"])
def test_sentence_pairs_are_a_function_of_the_generator_seed(mode: str) -> None:
    window = _window(16 * 29, seed=5)
    one, again, other = (_pairs(mode, window, 16, seed=s)[0] for s in (6, 6, 7))
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert not torch.equal(one["input_ids"], other["input_ids"])
    assert not torch.equal(one["nsp_labels"], other["nsp_labels"])


def test_sentence_pairs_consume_seq_len_minus_3_tokens_and_have_their_name() -> None:
    nsp, sop = (build_objective("mlm", 32, TOKENIZER, nsp=m) for m in ("next", "order"))
    assert (nsp.row_tokens, nsp.overlap, nsp.name, sop.name) == (29, 0, "mlm+nsp", "mlm+sop")


@pytest.mark.parametrize("change, message", [
    ({"name": "clm"}, "data.nsp applies to data.objective=mlm, not clm"),
    ({"nsp": "random"}, "data.nsp=random is not a sentence-pair task; valid: next, order"),
    ({"doc_masking": True}, "data.doc_masking does not apply with data.nsp"),
    ({"seq_len": 4}, "data.seq_len=4 is too short"),
    ({"tokenizer": SimpleNamespace(**{**vars(TOKENIZER), "sep_id": -1})},
     "needs \\[CLS\\] and \\[SEP\\] tokens; tok.model lacks them"),
])
def test_bad_sentence_pair_settings_are_config_errors(change: dict, message: str) -> None:
    args = {"name": "mlm", "seq_len": 32, "tokenizer": TOKENIZER, "nsp": "next", **change}
    with pytest.raises(ConfigError, match=message):
        build_objective(args.pop("name"), args.pop("seq_len"), args.pop("tokenizer"), **args)


def test_sentence_pairs_resume_exactly_and_refuse_whole_document_rows(prepared: Manifest
                                                                      ) -> None:
    tokenizer = SimpleNamespace(**{**vars(TOKENIZER), "eos_id": prepared.eos_id})
    objective = build_objective("mlm", 32, tokenizer, nsp="next")

    def stream(**kwargs):
        return build_train_stream(prepared, seq_len=32, micro_batch_size=4, seed=7, rank=0,
                                  world_size=1, num_workers=0, objective=objective, **kwargs)

    straight = _resumes_exactly(stream)
    assert 0 < sum(b["nsp_labels"].sum().item() for b in straight) < 6 * 4
    with pytest.raises(ConfigError, match="pack_whole_docs supports clm and mlm, not mlm\\+nsp"):
        stream(pack_whole_docs=True)


def test_whole_word_masking_of_sentence_pairs_never_chooses_cls_or_sep(
        wwm_tokenizer: Tokenizer, wwm_stream: np.ndarray) -> None:
    """A real tokenizer's [CLS] and [SEP] ids, words of their own, are never chosen; the pairs'
    paragraphs (real documents) give random Bs from other paragraphs."""
    tok, rows = wwm_tokenizer, 64
    pairs = build_objective("mlm", 64, tok, nsp="next", whole_word_masking=True)
    batch = pairs.batch(wwm_stream, rows, np.random.default_rng(9))
    labels, inputs = batch["labels"].numpy(), batch["input_ids"].numpy()
    original = np.where(labels != IGNORE, labels, inputs)
    specials = (original == tok.cls_id) | (original == tok.sep_id)
    assert (specials.sum(1) == 3).all() and not (labels[specials] != IGNORE).any()
    assert 0.1 < (labels != IGNORE).mean() < 0.2
    assert 0.3 < batch["nsp_labels"].float().mean() < 0.7
