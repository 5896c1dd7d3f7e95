"""Llama-style GPT: sizes, GQA, causality, backends, and parity with HF's LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch

from megatrain.errors import ConfigError
from megatrain.models import Llama, LlamaConfig, build_model, resolve_model_config
from megatrain.models.common.attention import eager_attention, repeat_kv, sdpa_attention
from megatrain.models.llama import llama_flops_per_token
from megatrain.models.llama.hf import (
    llama_config_from_hf,
    llama_config_to_hf,
)

transformers = pytest.importorskip("transformers")

# n_kv_heads < n_heads (GQA, 2 groups), a non-default θ and eps, so a mixed-up one shows.
CONFIG = LlamaConfig(n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, d_ff=160, vocab_size=101,
                     max_seq_len=32, rope_theta=5000.0, norm_eps=1e-6, attn_impl="sdpa")


def _ids(B: int = 3, T: int = 24, vocab: int = CONFIG.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and sizeable (init sets norms to 1, which would hide a swapped
    norm), so the logits are far from zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.1
        p.copy_(1.0 + noise if "norm" in name or "ln_" in name else noise)


# --- sizes and config -----------------------------------------------------------------------

@pytest.mark.parametrize("size", ["llama-tiny", "llama-1b", "llama-3b", "llama-7b"])
def test_every_size_builds_on_meta(size: str) -> None:
    model, spec, config = build_model({"family": "llama", "size": size}, 32000, device="meta")
    assert spec.family == "llama" and spec.objective == "clm"
    assert len(model.blocks) == config.n_layers and model.config is config
    assert model.num_params() == config.num_params()
    assert (model.lm_head.weight is model.tok_emb.weight) == config.tie_embeddings


def test_llama2_7b_is_6_74b() -> None:
    model, _, config = build_model({"family": "llama", "size": "llama-7b"}, 32000, device="meta")
    assert model.num_params() == 6_738_415_616  # Llama-2-7B as published
    assert (config.n_kv_heads, config.rope_theta, config.tie_embeddings) == (32, 10000.0, False)


def test_llama32_1b_shape() -> None:
    model, _, config = build_model({"family": "llama", "size": "llama-1b"}, 128256,
                                   device="meta")
    assert model.num_params() == 1_235_814_400  # Llama-3.2-1B (tied head)
    assert (config.n_kv_heads, config.rope_theta) == (8, 500000.0)


def test_none_means_the_size_default_and_explicit_keys_override() -> None:
    cfg = {"family": "llama", "size": "llama-tiny", "n_kv_heads": None, "rope_theta": None,
           "tie_embeddings": None}
    assert resolve_model_config(cfg, 100).n_kv_heads == 2
    config = resolve_model_config({**cfg, "n_kv_heads": 1, "tie_embeddings": True}, 100)
    assert (config.n_kv_heads, config.tie_embeddings, config.rope_theta) == (1, True, 10000.0)


def test_n_kv_heads_defaults_to_n_heads_without_a_size() -> None:
    dims = {"family": "llama", "size": None, "n_layers": 1, "d_model": 16, "n_heads": 4,
            "d_ff": 32, "max_seq_len": 8}
    assert resolve_model_config(dims, 50).n_kv_heads == 4


@pytest.mark.parametrize("override, message", [
    ({"n_kv_heads": 3}, "n_kv_heads=3 must be a positive divisor of model.n_heads=4"),
    ({"d_model": 132, "n_heads": 4, "n_kv_heads": 4}, "even head dim"),
    ({"norm_type": "layer"}, "model.norm_type is not a setting of the llama family"),
])
def test_bad_llama_configs_are_config_errors(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_model_config({"family": "llama", "size": "llama-tiny", **override}, 100)


def test_flops_count_every_parameter() -> None:
    n = CONFIG.num_params()
    # per block: 2·64 + 64·(64 + 2·32) + 64·64 + 3·64·160 = 43136; 2 · 101·64 untied + ln_f
    assert n == 3 * 43136 + 2 * 101 * 64 + 64
    assert llama_flops_per_token(CONFIG, 32) == 6 * n + 12 * 3 * 64 * 32


# --- behaviour ------------------------------------------------------------------------------

def test_gqa_shapes() -> None:
    model = Llama(CONFIG)
    attn = model.blocks[0].attn
    assert attn.qkv.weight.shape == (64 + 2 * 2 * 16, 64) and attn.qkv.bias is None
    assert model.lm_head.weight is not model.tok_emb.weight  # untied by default
    assert model(_ids()).shape == (3, 24, 101)
    kv = torch.randn(2, 2, 5, 16)
    rep = repeat_kv(kv, 4)  # kv head j serves query heads 2j and 2j + 1
    assert rep.shape == (2, 4, 5, 16) and torch.equal(rep[:, 1], kv[:, 0])
    assert torch.equal(rep[:, 2], kv[:, 1])


@pytest.mark.parametrize("causal", [True, False])
def test_gqa_backends_match_per_group_attention(causal: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 8, generator=g)
    k, v = torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    out = sdpa_attention(q, k, v, causal)
    torch.testing.assert_close(out, eager_attention(q, k, v, causal), atol=1e-5, rtol=0)
    head3 = eager_attention(q[:, 3:4], k[:, 1:2], v[:, 1:2], causal)  # query head 3 -> kv 1
    torch.testing.assert_close(out[:, 3:4], head3, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_future_tokens_do_not_change_earlier_logits(impl: str) -> None:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**{**CONFIG.__dict__, "attn_impl": impl})).eval()
    ids = _ids(2, 12)
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % CONFIG.vocab_size
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


def test_sdpa_matches_eager() -> None:
    torch.manual_seed(0)
    sdpa = Llama(CONFIG).eval()
    eager = Llama(LlamaConfig(**{**CONFIG.__dict__, "attn_impl": "eager"})).eval()
    eager.load_state_dict(sdpa.state_dict())
    torch.testing.assert_close(sdpa(_ids()), eager(_ids()), atol=1e-5, rtol=0)


def test_tied_head_shares_the_embedding() -> None:
    model = Llama(LlamaConfig(**{**CONFIG.__dict__, "tie_embeddings": True}))
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.num_params() == CONFIG.num_params() - 101 * 64


# --- parity with transformers ---------------------------------------------------------------

def _hf_model(config: LlamaConfig = CONFIG) -> transformers.LlamaForCausalLM:
    model = transformers.LlamaForCausalLM._from_config(llama_config_to_hf(config),
                                                       attn_implementation="eager")
    _randomize(model, seed=0)
    return model.eval()


def test_config_round_trips() -> None:
    hf = llama_config_to_hf(CONFIG)
    assert (hf.num_key_value_heads, hf.rms_norm_eps, hf.tie_word_embeddings) == (2, 1e-6, False)
    assert llama_config_from_hf(hf) == LlamaConfig(**{**CONFIG.__dict__, "attn_impl": "auto"})


def test_rope_scaling_is_refused() -> None:
    hf = llama_config_to_hf(CONFIG)
    hf.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    with pytest.raises(ValueError, match="rope_type=linear"):
        llama_config_from_hf(hf)


