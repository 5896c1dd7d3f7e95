"""KV-cached, batched generation against uncached decoding and ``transformers``' ``generate`` on
the exported model (fp32, tiny random models): the same tokens, token for token, on every CPU
attention backend; a left-padded batch gives each row what it gives alone; top-k, top-p and the
repetition penalty keep and change the logits ``transformers``' processors do; text-level stop
strings; ``megatrain-generate`` reads and writes JSONL and refuses a BERT checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from megatrain.cli.generate import main as generate_main
from megatrain.models import generate
from megatrain.models.common.attention import AttnMask, make_attention_fn
from megatrain.models.generation import (
    cut_at_stop,
    generate_ids,
    generate_text,
    repetition_penalty,
    top_k_filter,
    top_p_filter,
)
from megatrain.models.registry import MODEL_SPECS
from tests.unit.checkpoints import write_stage0_checkpoint
from tests.unit.test_hf_parity import VOCAB, _config, _hf_model, _randomize

transformers = pytest.importorskip("transformers")

DECODERS = ["gpt", "llama"]
FAMILIES = ["gpt", "llama", "t5"]
IMPLS = ["sdpa", "eager", "flex"]


def _models(family: str, impl: str = "sdpa", seed: int = 4, **changes: object
            ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random megatrain model and ``transformers``' model from its exported weights."""
    spec = MODEL_SPECS[family]
    built = "sdpa" if impl == "flex" else impl  # flex refuses CPU training: swap it in after
    model = spec.build(_config(family, attn_impl=built, **changes), "cpu", torch.float32).eval()
    if impl == "flex":
        for module in model.modules():
            if hasattr(module, "attn_fn"):
                module.attn_fn = make_attention_fn("flex")
    _randomize(model, seed=seed)
    hf = _hf_model(spec, model.config, seed=seed + 1)
    hf.load_state_dict(spec.hf.state_dict_to_hf(model.state_dict()), strict=True)
    return model, hf


def _prompt(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(hf: torch.nn.Module, family: str, prompt: torch.Tensor, n: int,
               mask: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
    mask = torch.ones_like(prompt) if mask is None else mask
    out = hf.generate(input_ids=prompt, attention_mask=mask, do_sample=False, num_beams=1,
                      max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **kwargs)
    return out[:, 1:] if family == "t5" else out  # transformers keeps T5's start token


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_cached_greedy_equals_uncached_and_transformers(family: str, impl: str) -> None:
    model, hf = _models(family, impl)
    prompt = _prompt(3, 9)
    cached = generate(model, prompt, 16, temperature=0.0)
    uncached = generate(model, prompt, 16, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, _hf_greedy(hf, family, prompt, 16))
    assert len(cached[:, -16:].unique()) > 3  # not one token whatever the prompt


@pytest.mark.parametrize("impl", IMPLS)
@torch.no_grad()
def test_fewer_queries_than_keys_align_the_causal_mask_bottom_right(impl: str) -> None:
    """A decode step's 3 queries are the last 3 of 8 positions: each backend gives the last 3
    rows of full causal attention (SDPA's own is_causal would align them top-left), with and
    without key padding, with grouped kv heads."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 8, 16, generator=g) for n in (4, 2, 2))
    padding = torch.ones(2, 8, dtype=torch.bool)
    padding[1, :3] = False
    eager = make_attention_fn("eager")
    for mask in (None, AttnMask(key_padding=padding)):
        full = eager(q, k, v, True, mask=mask)[:, :, -3:]
        step = make_attention_fn(impl)(q[:, :, -3:], k, v, True, mask=AttnMask(
            key_padding=padding) if mask else None)
        torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_cached_step_logits_equal_a_full_forward(family: str) -> None:
    """The cache path's logits, not just its argmax: prompt then 3 single-token steps equal the
    full forward's last positions."""
    model, _ = _models(family)
    ids = _prompt(2, 10)
    if family == "t5":
        memory, dec = model.encode(ids), _prompt(2, 6, seed=1)
        full = model.decode(dec, memory)
        cache = model.new_cache(2, 6)
        steps = [model.decode(dec[:, :3], memory, cache=cache)]
        steps += [model.decode(dec[:, t:t + 1], memory, cache=cache) for t in range(3, 6)]
    else:
        full, cache = model(ids), model.new_cache(2, 10)
        steps = [model(ids[:, :7], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(7, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == full.size(1)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("family", DECODERS)
@torch.no_grad()
def test_left_padded_batch_gives_each_row_what_it_gives_alone(family: str,
                                                              use_cache: bool) -> None:
    model, hf = _models(family)
    prompts = [_prompt(1, n, seed=n)[0].tolist() for n in (3, 11, 7)]
    batched = generate_ids(model, prompts, 12, batch_size=3, use_cache=use_cache)
    alone = [generate(model, torch.tensor([p]), 12, temperature=0.0)[0, len(p):].tolist()
             for p in prompts]
    assert batched == alone
    # transformers on the same left-padded batch (its position ids also start after padding)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    assert _hf_greedy(hf, family, ids, 12, mask)[:, width:].tolist() == alone


@torch.no_grad()
def test_padded_encoder_inputs_give_each_row_what_it_gives_alone() -> None:
    model, hf = _models("t5")
    prompts = [_prompt(1, n, seed=n)[0].tolist() for n in (4, 10)]
    batched = generate_ids(model, prompts, 10, batch_size=2)
    alone = [generate(model, torch.tensor([p]), 10, temperature=0.0)[0].tolist()
             for p in prompts]
    assert batched == alone
    ids = torch.tensor([p + [0] * (10 - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (10 - len(p)) for p in prompts])
    assert _hf_greedy(hf, "t5", ids, 10, mask).tolist() == alone


@pytest.mark.parametrize("family", DECODERS)
@torch.no_grad()
def test_past_max_seq_len_the_window_slides_as_without_a_cache(family: str) -> None:
    model, _ = _models(family, max_seq_len=16)
    prompt = _prompt(2, 10)
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    for m in (None, mask):
        cached = generate(model, prompt, 14, temperature=0.0, attention_mask=m)
        assert torch.equal(cached, generate(model, prompt, 14, temperature=0.0,
                                            attention_mask=m, use_cache=False))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_repetition_penalty_generation_equals_transformers(family: str) -> None:
    model, hf = _models(family)
    prompt = _prompt(2, 8)
    ours = generate(model, prompt, 12, temperature=0.0, repetition_penalty=1.8)
    assert torch.equal(ours, _hf_greedy(hf, family, prompt, 12, repetition_penalty=1.8))
    assert not torch.equal(ours, generate(model, prompt, 12, temperature=0.0))


def _logits(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 50, generator=g) * 3
    logits[0, :5] = 2.0  # ties at the boundary
    logits[1] = 0.0  # flat: ties everywhere
    return logits


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_top_p_keeps_the_tokens_transformers_keeps(p: float) -> None:
    from transformers.generation.logits_process import TopPLogitsWarper

    for seed in range(3):
        logits = _logits(seed)
        expected = TopPLogitsWarper(top_p=p)(None, logits.clone())
        actual = top_p_filter(logits.clone(), p)
        assert torch.equal(actual.isinf(), expected.isinf())
        assert torch.equal(actual[~actual.isinf()], logits[~actual.isinf()])
    assert top_p_filter(_logits(), 0.05).isfinite().sum(-1).min() >= 1  # the top token stays


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_keeps_the_tokens_transformers_keeps(k: int) -> None:
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = _logits()
    expected = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(top_k_filter(logits, k).isinf(), expected.isinf())


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_equals_transformers(penalty: float) -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from megatrain.models.generation import _seen

    logits, ids = _logits(), torch.randint(0, 50, (6, 20), generator=torch.Generator())
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    torch.testing.assert_close(repetition_penalty(logits, _seen(ids, None, 50), penalty),
                               expected, atol=0, rtol=0)


@torch.no_grad()
def test_sampling_is_seeded_and_top_p_near_zero_is_greedy() -> None:
    model, _ = _models("llama")
    prompt = _prompt(4, 5)
    def sample(seed: int, **kw: object) -> torch.Tensor:
        return generate(model, prompt, 10, temperature=1.0, top_k=20, top_p=0.9,
                        generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    assert torch.equal(sample(1), sample(1, use_cache=False))
    tiny = generate(model, prompt, 10, temperature=1.0, top_p=1e-6)
    assert torch.equal(tiny, generate(model, prompt, 10, temperature=0.0))


class _CharTokenizer:
    """One character per id 1..100 (Latin-1 letters and signs); 0 is EOS."""

    eos_id = 0
    chars = "".join(chr(c) for c in range(161, 161 + VOCAB - 1))

    def encode(self, text: str) -> list[int]:
        return [self.chars.index(c) + 1 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i - 1] if 0 < i <= len(self.chars) else "?" for i in ids)


@torch.no_grad()
def test_generate_text_cuts_at_stop_strings_and_eos() -> None:
    model, _ = _models("gpt")
    tok = _CharTokenizer()
    prompts = [tok.decode(_prompt(1, n, seed=n)[0].clamp(min=1).tolist()) for n in (9, 2, 14)]
    full = generate_text(model, tok, prompts, max_new_tokens=20, batch_size=2)
    assert len(full) == 3 and all(len(t) == 20 for t in full)  # no EOS drawn: every token
    stop = full[0][5:7]  # a string the first output contains
    stopped = generate_text(model, tok, prompts, max_new_tokens=20, batch_size=2, stop=[stop])
    assert stopped == [cut_at_stop(t, [stop]) for t in full]
    assert stopped[0] == full[0][:full[0].index(stop)]
    ids = [tok.encode(p) for p in prompts]
    ended = generate_ids(model, ids, 20, batch_size=2, eos_id=tok.eos_id,
                         stop_fn=lambda row: stop in tok.decode(row))
    end = full[0].index(stop) + len(stop)  # stopped early: the step that wrote the stop string
    assert end < 20 and ended[0] == tok.encode(full[0][:end])
    with pytest.raises(ValueError, match="stop_fn needs eos_id"):  # no token ends a row
        generate_ids(model, ids, 20, stop_fn=lambda row: stop in tok.decode(row))
    assert cut_at_stop("abcXdefY", ["Y", "X", ""]) == "abc"
    j = next(j for j in range(1, 20) if full[1][j] not in full[1][:j])  # a new token
    eos = generate_ids(model, [tok.encode(p) for p in prompts], 20,
                       eos_id=tok.encode(full[1][j])[0])
    assert eos[1] == tok.encode(full[1][:j])  # EOS and what follows left out
    assert generate_text(model, tok, prompts, max_new_tokens=20, batch_size=2, stop=[stop],
                         stop_early=False) == stopped  # every step run: the same text
    one, eos_id = torch.tensor([ids[1]]), tok.encode(full[1][j])[0]
    for stop_early, steps in ((True, j + 1), (False, 20)):  # up to EOS, or every step
        out = generate(model, one, 20, temperature=0.0, eos_id=eos_id, stop_early=stop_early)
        assert out.shape == (1, one.size(1) + steps)


# --- megatrain-generate ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megatrain.data.prepare.train_tokenizer import train_tokenizer

    corpus = Path(json.__file__).read_text()[:8000]
    return train_tokenizer([corpus], tmp_path_factory.mktemp("tok") / "tokenizer.model", 512)


def _checkpoint(tmp_path: Path, family: str, tokenizer_path: Path) -> Path:
    spec = MODEL_SPECS[family]
    config = dataclasses.replace(_config(family), vocab_size=512)
    model = spec.build(config, "cpu", torch.float32)
    _randomize(model, seed=0)
    write_stage0_checkpoint(tmp_path / family / "checkpoints" / "step_7", family, model,
                            tokenizer_path)
    return tmp_path / family


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_cli_writes_one_jsonl_row_per_prompt(family: str, tokenizer_path: Path,
                                             tmp_path: Path) -> None:
    run = _checkpoint(tmp_path, family, tokenizer_path)
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "def f(x):", "id": 1}, {"input": "import json"}, {"prompt": ""}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    argv = ["--checkpoint", str(run), "--prompts", str(prompts), "--out", str(out),
            "--batch-size", "2", "--max-new-tokens", "8", "--temperature", "0"]
    assert generate_main(argv) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "output"} for r in written] == rows
    assert all(isinstance(r["output"], str) for r in written)
    assert any(r["output"] for r in written)
    one = tmp_path / "one.jsonl"
    assert generate_main([*argv[:2], "--prompts", str(prompts), "--out", str(one),
                          "--batch-size", "1", "--max-new-tokens", "8", "--temperature", "0",
                          "--no-cache"]) == 0
    assert one.read_text() == out.read_text()  # batched + cached == one at a time, uncached


def test_cli_refuses_bert_and_bad_prompt_files(tokenizer_path: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bert = _checkpoint(tmp_path, "bert", tokenizer_path)
    assert generate_main(["--checkpoint", str(bert), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not generate text" in err and "bert" in err
    gpt = _checkpoint(tmp_path, "gpt", tokenizer_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert generate_main(["--checkpoint", str(gpt), "--prompts", str(bad)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert generate_main(["--checkpoint", str(gpt), "--prompts", str(tmp_path / "no")]) == 2
    assert "no such file" in capsys.readouterr().err
