"""Masks and biases on every CPU backend: padding, documents, T5's bias, cross-attention, GQA.

Each backend is checked against the eager reference (fp32), and document masking against running
every document on its own.
"""

from __future__ import annotations

import pytest
import torch

from megatrain.errors import ConfigError
from megatrain.models import GPT, GPTConfig, Llama, LlamaConfig
from megatrain.models.common import AttnMask, positions_in_documents, resolve_attn_impl
from megatrain.models.common.attention import eager_attention, make_attention_fn, varlen_layout

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CPU = torch.device("cpu")
BACKENDS = ["sdpa", "flex", "eager"]


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _padding(B: int, T: int) -> torch.Tensor:
    """Row b keeps its first T - 3·b tokens (right padding), the last row is left-padded."""
    keep = torch.ones(B, T, dtype=torch.bool)
    for b in range(B - 1):
        keep[b, T - 3 * b:] = False
    keep[B - 1, :4] = False
    return keep


DOCS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [3] * 16])  # (2, 16): 3 documents, then 1


def _mask(kind: str, B: int, Tq: int, Tk: int, nh: int) -> AttnMask:
    if kind == "padding":
        return AttnMask(key_padding=_padding(B, Tk))
    if kind == "documents":
        return AttnMask(doc_ids=DOCS)
    if kind == "bias":
        return AttnMask(bias=_rand(1, nh, Tq, Tk, seed=5))
    return AttnMask(key_padding=_padding(B, Tk), bias=_rand(B, nh, Tq, Tk, seed=6))


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("kind", ["padding", "documents", "bias", "padding+bias"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nkv", [4, 2])
def test_backend_matches_eager_with_masks(impl: str, kind: str, causal: bool, nkv: int) -> None:
    B, nh, T, hs = 2, 4, 16, 8
    q, k, v = _rand(B, nh, T, hs, seed=1), _rand(B, nkv, T, hs, seed=2), _rand(B, nkv, T, hs, seed=3)
    ref = eager_attention(q, k, v, causal, mask=_mask(kind, B, T, T, nh))
    out = make_attention_fn(impl)(q, k, v, causal, mask=_mask(kind, B, T, T, nh))
    # padded queries (a left-padded causal one sees no key at all) have no defined output
    real = _padding(B, T) if "padding" in kind else torch.ones(B, T, dtype=torch.bool)
    sel = real[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[sel], ref[sel], atol=2e-5, rtol=0)


@pytest.mark.parametrize("impl", BACKENDS)
def test_cross_attention_with_padding_and_scale(impl: str) -> None:
    B, nh, Tq, Tk, hs = 3, 4, 5, 9, 8
    q, k, v = _rand(B, nh, Tq, hs, seed=1), _rand(B, nh, Tk, hs, seed=2), _rand(B, nh, Tk, hs, seed=3)
    mask = AttnMask(key_padding=_padding(B, Tk), bias=_rand(1, nh, Tq, Tk, seed=4))
    ref = eager_attention(q, k, v, False, mask=mask, scale=1.0)
    out = make_attention_fn(impl)(q, k, v, False, mask=AttnMask(mask.key_padding, bias=mask.bias),
                                  scale=1.0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa"])  # flex has no backward on CPU (tests/gpu checks it)
def test_bias_gradient_matches_eager(impl: str) -> None:
    q, k, v = (_rand(2, 4, 8, 8, seed=s).requires_grad_() for s in (1, 2, 3))
    grads = []
    for fn in (eager_attention, make_attention_fn(impl)):
        bias = _rand(1, 4, 8, 8, seed=4).requires_grad_()
        fn(q, k, v, True, mask=AttnMask(bias=bias)).square().sum().backward()
        grads.append(bias.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=0)


def test_mask_forms_are_built_once_per_forward() -> None:
    mask = AttnMask(key_padding=_padding(2, 16))
    q = _rand(2, 4, 16, 8)
    eager_attention(q, q, q, True, mask=mask)
    first = dict(mask.derived)
    eager_attention(q, q, q, True, mask=mask)
    assert len(first) == 1 and all(mask.derived[k] is v for k, v in first.items())


def test_varlen_layout_splits_rows_documents_and_padding() -> None:
    docs = torch.tensor([[7, 7, 8, 8, 8, 9], [1, 1, 1, 1, 2, 2]])
    padding = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    indices, cu, max_len = varlen_layout(AttnMask(key_padding=padding, doc_ids=docs), 2, 6)
    assert indices.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert cu.tolist() == [0, 2, 5, 6, 9] and cu.dtype == torch.int32 and max_len == 3


def test_positions_restart_at_each_document() -> None:
    assert positions_in_documents(DOCS)[0].tolist() == [*range(5), *range(7), *range(4)]
    assert positions_in_documents(DOCS)[1].tolist() == list(range(16))


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])  # flex cannot be built on CPU
def test_document_masking_equals_each_document_alone(family: str, impl: str) -> None:
    torch.manual_seed(0)
    if family == "gpt":
        model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=50,
                              max_seq_len=16, attn_impl=impl))
    else:
        model = Llama(LlamaConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                                  vocab_size=50, max_seq_len=16, attn_impl=impl))
    model.eval()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    packed = model(ids, doc_ids=DOCS)
    for row in range(2):
        for doc in DOCS[row].unique():
            cols = (DOCS[row] == doc).nonzero().squeeze(1)
            alone = model(ids[row:row + 1, cols])
            torch.testing.assert_close(packed[row, cols], alone[0], atol=2e-5, rtol=0)


def test_bias_rules_out_flash_attn_and_auto_stays_fused_on_cpu() -> None:
    with pytest.raises(ConfigError, match="flash_attn: cannot add an attention bias"):
        resolve_attn_impl("flash_attn", CPU, torch.float32, bias=True)
    assert resolve_attn_impl("auto", CPU, torch.float32, bias=True) == "sdpa"
    with pytest.raises(ConfigError, match="flex: needs a CUDA GPU to train"):
        resolve_attn_impl("flex", CPU, torch.float32, bias=True)


def test_flex_refuses_dropout() -> None:
    q = _rand(1, 2, 4, 8)
    with pytest.raises(ValueError, match="no attention dropout"):
        make_attention_fn("flex")(q, q, q, True, 0.1)
