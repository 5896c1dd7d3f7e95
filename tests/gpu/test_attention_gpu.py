"""Attention backends on a CUDA GPU: auto never picks a slow path, and bf16 matches eager."""

from __future__ import annotations

import pytest
import torch

from megatrain.errors import ConfigError
from megatrain.models.common.attention import (
    AttnMask,
    eager_attention,
    make_attention_fn,
    resolve_attn_impl,
)
from megatrain.models.gpt2 import GPT, GPTConfig

CUDA = torch.device("cuda")


def _qkv(dtype: torch.dtype, B: int = 2, nh: int = 8, T: int = 256, hs: int = 64) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(0)
    return tuple(torch.randn(B, nh, T, hs, generator=g, device=CUDA, dtype=dtype)
                 for _ in range(3))


def _fast_backends() -> list[str]:
    """Every backend that resolves on this GPU in bf16 (flash_attn only when installed)."""
    impls = ["sdpa"]
    if torch.backends.cudnn.is_available():
        impls.append("cudnn")
    try:
        resolve_attn_impl("flash_attn", CUDA, torch.bfloat16)
        impls.append("flash_attn")
    except ConfigError:
        pass
    return impls


def test_auto_picks_flash_attn_or_pinned_sdpa() -> None:
    assert resolve_attn_impl("auto", CUDA, torch.bfloat16) in ("flash_attn", "cudnn", "sdpa")
    assert resolve_attn_impl("auto", CUDA, torch.float32) == "sdpa"


@pytest.mark.parametrize("causal", [True, False])
def test_bf16_backends_match_eager(causal: bool) -> None:
    q, k, v = _qkv(torch.bfloat16)
    ref = eager_attention(q.float(), k.float(), v.float(), causal)
    for impl in _fast_backends():
        out = make_attention_fn(impl)(q, k, v, causal, 0.0)
        assert out.dtype == torch.bfloat16 and out.shape == q.shape
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2, msg=impl)


def test_fp32_sdpa_matches_eager() -> None:
    q, k, v = _qkv(torch.float32)
    out = make_attention_fn("sdpa")(q, k, v, True, 0.0)
    torch.testing.assert_close(out, eager_attention(q, k, v, True), atol=1e-4, rtol=1e-4)


def test_sdpa_never_falls_back_to_math() -> None:
    # head size 512 is beyond the FlashAttention kernel: pinned SDPA must refuse, not run slowly.
    q, k, v = _qkv(torch.bfloat16, hs=512)
    with pytest.raises(RuntimeError):
        make_attention_fn("sdpa")(q, k, v, True, 0.0)


def test_gpt_trains_a_step_in_bf16() -> None:
    config = GPTConfig(n_layers=2, d_model=128, n_heads=2, d_ff=512, vocab_size=256,
                       max_seq_len=128)
    model = GPT(config, device=CUDA, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (4, 128), device=CUDA)
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    loss.backward()
    assert torch.isfinite(loss) and model.tok_emb.weight.grad is not None


def _masks(B: int, nh: int, T: int) -> dict[str, AttnMask]:
    keep = torch.ones(B, T, dtype=torch.bool, device=CUDA)
    keep[0, T // 2:] = False
    docs = (torch.arange(T, device=CUDA) // (T // 4)).expand(B, T)  # four documents per row
    bias = torch.randn(1, nh, T, T, device=CUDA)
    return {"padding": AttnMask(key_padding=keep), "documents": AttnMask(doc_ids=docs),
            "bias": AttnMask(bias=bias)}


@pytest.mark.parametrize("kind", ["padding", "documents", "bias"])
def test_masked_backends_match_eager_in_bf16(kind: str) -> None:
    q, k, v = _qkv(torch.bfloat16)
    impls = ["sdpa", "flex"] + [i for i in _fast_backends() if i == "flash_attn" and kind != "bias"]
    for impl in impls:
        ref = eager_attention(q.float(), k.float(), v.float(), True, mask=_masks(2, 8, 256)[kind])
        out = make_attention_fn(impl)(q, k, v, True, 0.0, _masks(2, 8, 256)[kind])
        real = _masks(2, 8, 256)["padding"].key_padding if kind == "padding" else None
        if real is not None:  # padded queries of a causal row still see earlier real keys
            ref, out = ref[:, :, :128], out[:, :, :128]
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2, msg=impl)


def test_flex_bias_gradient_matches_eager() -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(torch.float32, T=128))
    grads = []
    for impl in ("eager", "flex"):
        bias = torch.zeros(1, 8, 128, 128, device=CUDA, requires_grad=True)
        make_attention_fn(impl)(q, k, v, False, 0.0, AttnMask(bias=bias)).square().sum().backward()
        grads.append(bias.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-3, rtol=1e-3)


def test_auto_with_bias_is_flex() -> None:
    assert resolve_attn_impl("auto", CUDA, torch.bfloat16, bias=True) == "flex"
