"""Parity with Hugging Face's GPT2LMHeadModel: converted weights give the same logits and tokens."""

from __future__ import annotations

import pytest
import torch

from megatrain.models import GPT, GPTConfig, generate
from megatrain.models.gpt2.hf import (
    gpt2_config_from_hf,
    gpt2_config_to_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)

transformers = pytest.importorskip("transformers")

CONFIG = GPTConfig(n_layers=3, d_model=64, n_heads=4, d_ff=256, vocab_size=101, max_seq_len=32,
                   attn_impl="sdpa")


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and sizeable (init zeroes biases and sets LayerNorm to 1/0, which
    would hide a mixed-up bias or LayerNorm), so the logits are far from zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.1
        p.copy_(1.0 + noise if "ln_" in name and name.endswith("weight") else noise)


def _hf_model() -> transformers.GPT2LMHeadModel:
    model = transformers.GPT2LMHeadModel._from_config(gpt2_config_to_hf(CONFIG),
                                                      attn_implementation="eager")
    _randomize(model, seed=0)
    return model.eval()


def _ids(B: int = 3, T: int = 24) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))


def test_config_round_trips() -> None:
    hf = gpt2_config_to_hf(CONFIG)
    assert (hf.n_layer, hf.n_embd, hf.n_head, hf.n_inner, hf.n_positions) == (3, 64, 4, 256, 32)
    assert gpt2_config_from_hf(hf) == GPTConfig(**{**CONFIG.__dict__, "attn_impl": "auto"})


def test_hf_to_megatrain_logits_match() -> None:
    hf = _hf_model()
    model = GPT(gpt2_config_from_hf(hf.config)).eval()
    model.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=True)
    ids = _ids()
    expected = hf(ids).logits
    actual = model(ids)
    assert (actual - expected).abs().max().item() <= 1e-4
    assert expected.abs().max() > 1.0  # not trivially small logits


def test_megatrain_to_hf_logits_match() -> None:
    model = GPT(CONFIG).eval()
    _randomize(model, seed=2)
    hf = transformers.GPT2LMHeadModel._from_config(gpt2_config_to_hf(CONFIG),
                                                   attn_implementation="eager").eval()
    hf.load_state_dict(state_dict_to_hf(model.state_dict()), strict=True)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # still tied
    ids = _ids()
    expected = model(ids)
    assert (hf(ids).logits - expected).abs().max().item() <= 1e-4
    assert expected.abs().max() > 1.0


def test_state_dict_round_trip_is_exact() -> None:
    sd = GPT(CONFIG).state_dict()
    back = state_dict_from_hf(state_dict_to_hf(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_greedy_generation_matches_hf() -> None:
    hf = _hf_model()
    model = GPT(gpt2_config_from_hf(hf.config)).eval()
    model.load_state_dict(state_dict_from_hf(hf.state_dict()))
    prompt = _ids(B=2, T=5)
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=12, pad_token_id=0)
    assert torch.equal(generate(model, prompt, 12, temperature=0.0), expected)


def _padding_mask(B: int = 3, T: int = 24) -> torch.Tensor:
    """Row 0 full, row 1 right-padded, row 2 left-padded (1 = token, 0 = padding)."""
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 7:] = 0
    mask[2, :5] = 0
    return mask


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_logits_match_hf_with_padding_in_the_batch(impl: str) -> None:
    hf = _hf_model()
    model = GPT(GPTConfig(**{**gpt2_config_from_hf(hf.config).__dict__, "attn_impl": impl}))
    model.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=True)
    ids, mask = _ids(), _padding_mask()
    expected = hf(ids, attention_mask=mask).logits
    actual = model.eval()(ids, attention_mask=mask)
    real = mask.bool()
    assert (actual[real] - expected[real]).abs().max().item() <= 1e-4
    unpadded = model(ids[1:2, :17])  # padding changes nothing at the real positions
    assert (unpadded[0] - actual[1, :17]).abs().max().item() <= 1e-5
