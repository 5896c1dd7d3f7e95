"""Attention backends on CPU: resolution, errors that say why, sdpa == eager, real causality."""

from __future__ import annotations

import pytest
import torch

from megatrain.errors import ConfigError
from megatrain.models.common.attention import (
    eager_attention,
    make_attention_fn,
    resolve_attn_impl,
    sdpa_attention,
)
from megatrain.models.gpt2 import GPT, GPTConfig

CPU = torch.device("cpu")


def _qkv(B: int = 2, nh: int = 4, T: int = 16, hs: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, nh, T, hs, generator=g) for _ in range(3))


def test_auto_on_cpu_is_sdpa(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="megatrain.models.common.attention"):
        assert resolve_attn_impl("auto", CPU, torch.float32) == "sdpa"
    assert "attention backend: sdpa" in caplog.text


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_explicit_cpu_backends_resolve_to_themselves(impl: str) -> None:
    assert resolve_attn_impl(impl, CPU, torch.float32) == impl


def test_flash_attn_on_cpu_says_why() -> None:
    with pytest.raises(ConfigError, match="attn_impl=flash_attn: .*needs a CUDA GPU"):
        resolve_attn_impl("flash_attn", CPU, torch.bfloat16)


def test_unknown_backend_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="valid: auto, flash_attn, sdpa, cudnn, flex, eager"):
        resolve_attn_impl("flex_attn", CPU, torch.float32)


def test_auto_is_not_a_runnable_function() -> None:
    with pytest.raises(ConfigError, match="resolve"):
        make_attention_fn("auto")


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_matches_eager_fp32(causal: bool) -> None:
    q, k, v = _qkv()
    ref = eager_attention(q, k, v, causal)
    out = sdpa_attention(q, k, v, causal)
    assert out.shape == ref.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_causal_and_bidirectional_differ() -> None:
    q, k, v = _qkv()
    assert not torch.allclose(eager_attention(q, k, v, True), eager_attention(q, k, v, False))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_future_tokens_do_not_change_earlier_logits(impl: str) -> None:
    torch.manual_seed(0)
    config = GPTConfig(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=50, max_seq_len=16,
                       attn_impl=impl)
    model = GPT(config).eval()
    ids = torch.randint(0, 50, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3  # the changed positions do see the change


def test_gpt_sdpa_matches_eager() -> None:
    config = GPTConfig(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=50, max_seq_len=16)
    torch.manual_seed(0)
    sdpa = GPT(GPTConfig(**{**config.__dict__, "attn_impl": "sdpa"})).eval()
    eager = GPT(GPTConfig(**{**config.__dict__, "attn_impl": "eager"})).eval()
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(sdpa(ids), eager(ids), atol=1e-5, rtol=0)
