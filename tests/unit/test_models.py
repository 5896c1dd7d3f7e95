"""The registry, every shipped size, GPT behaviour, init, FLOPs and generation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from megatrain.config.schema import ModelConfig
from megatrain.errors import ConfigError
from megatrain.models import (
    GPT,
    GPTConfig,
    build_model,
    generate,
    get_model_spec,
    mfu,
    peak_tflops_for,
    resolve_model_config,
)
from megatrain.models.gpt2 import gpt_flops_per_token

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
GPT_SIZES = ["gpt2-tiny", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"]
TINY = GPTConfig(n_layers=2, d_model=32, n_heads=4, d_ff=128, vocab_size=64, max_seq_len=16)


@pytest.mark.parametrize("size", GPT_SIZES)
def test_every_shipped_size_builds_on_meta(size: str) -> None:
    model, spec, config = build_model({"family": "gpt", "size": size}, 50257, device="meta")
    assert spec.family == "gpt" and spec.objective == "clm"
    assert config.d_ff == 4 * config.d_model and config.d_model % config.n_heads == 0
    assert len(model.blocks) == config.n_layers
    assert model.num_params(non_embedding=False) == config.num_params(non_embedding=False)
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_model_yaml_names_a_registered_size(path: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    assert set(cfg) == {"family", "size"} and cfg["size"] == path.stem
    assert resolve_model_config(cfg, 50257).n_layers > 0


@pytest.mark.parametrize("family, prefix", [("gpt", "gpt2-"), ("llama", "llama-"),
                                            ("bert", "bert-"), ("t5", "t5-")])
def test_every_size_has_a_yaml(family: str, prefix: str) -> None:
    shipped = sorted(p.stem for p in CONFIGS.glob(f"{prefix}*.yaml"))
    assert shipped == sorted(get_model_spec(family).sizes)


def test_gpt2_small_is_124m() -> None:
    model, _, _ = build_model({"family": "gpt", "size": "gpt2-small"}, 50257, device="meta")
    assert model.num_params(non_embedding=False) == 124_439_808  # GPT-2 small, as published


def test_unknown_family_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"model.family=mamba .*valid: gpt, llama"):
        get_model_spec("mamba")


def test_unknown_size_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"model.size=gpt2-huge is not a gpt size; valid: "
                                          r"gpt2-tiny, gpt2-small, gpt2-medium"):
        resolve_model_config({"family": "gpt", "size": "gpt2-huge"}, 100)


def test_explicit_fields_override_the_size_and_vocab_comes_from_the_tokenizer() -> None:
    cfg = ModelConfig(family="gpt", size="gpt2-small", n_layers=2, max_seq_len=128)
    config = resolve_model_config(cfg, vocab_size=4096)
    assert (config.n_layers, config.d_model, config.max_seq_len) == (2, 768, 128)
    assert config.vocab_size == 4096
    assert resolve_model_config({**cfg.__dict__, "vocab_size": 99}, 4096).vocab_size == 99


def test_no_size_needs_every_dim() -> None:
    with pytest.raises(ConfigError, match="n_layers"):
        resolve_model_config({"family": "gpt", "size": None, "d_model": 64}, 100)
    dims = {"family": "gpt", "size": None, "n_layers": 1, "d_model": 8, "n_heads": 2, "d_ff": 16,
            "max_seq_len": 8}
    assert resolve_model_config(dims, 100).d_ff == 16


@pytest.mark.parametrize("override, message", [
    ({"n_heads": 5}, "not divisible"),
    ({"n_layers": 0}, "positive"),
    ({"attn_impl": "fast"}, "valid: auto"),
    ({"n_kv_heads": 2}, "model.n_kv_heads is not a setting of the gpt family"),
])
def test_bad_dims_are_config_errors(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_model_config({"family": "gpt", "size": "gpt2-tiny", **override}, 100)


def test_forward_shape_dtype_and_tied_head() -> None:
    model = GPT(TINY)
    logits = model(torch.randint(0, 64, (3, 10)))
    assert logits.shape == (3, 10, 64) and logits.dtype == torch.float32
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.attn_impl == "sdpa"


def test_too_long_input_is_an_error() -> None:
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        GPT(TINY)(torch.zeros(1, 17, dtype=torch.long))


def test_build_in_bf16() -> None:
    model, _, _ = build_model({"family": "gpt", "size": "gpt2-tiny"}, 100, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_gpt2_init_scales_residual_projections() -> None:
    torch.manual_seed(0)
    config = GPTConfig(n_layers=8, d_model=256, n_heads=4, d_ff=1024, vocab_size=64,
                       max_seq_len=16)
    model = GPT(config)
    resid = torch.cat([torch.cat([b.attn.proj.weight.flatten(), b.mlp.proj.weight.flatten()])
                       for b in model.blocks])
    plain = torch.cat([b.attn.qkv.weight.flatten() for b in model.blocks])
    assert resid.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.02)
    assert plain.std().item() == pytest.approx(0.02, rel=0.02)
    assert all((b.attn.qkv.bias == 0).all() and (b.mlp.fc.bias == 0).all() for b in model.blocks)


def test_num_params_non_embedding_drops_positions_only() -> None:
    model = GPT(TINY)
    assert model.num_params(False) - model.num_params(True) == 16 * 32
    assert model.num_params(True) == TINY.num_params(non_embedding=True)


def test_flops_per_token_by_hand() -> None:
    # d=32, ff=128, L=2, V=64: per block 2·32 + (32·96+96) + (32·32+32) + 2·32 + (32·128+128)
    # + (128·32+32) = 12704; N = 64·32 + 2·12704 + 2·32 = 27520 (positions excluded)
    n = 27_520
    assert TINY.num_params(non_embedding=True) == n
    assert gpt_flops_per_token(TINY, seq_len=16) == 6 * n + 12 * 2 * 32 * 16
    assert get_model_spec("gpt").flops_per_token(TINY, 16) == 6 * n + 12 * 2 * 32 * 16


def test_mfu_and_peak() -> None:
    assert mfu(tokens_per_s=1000.0, flops_per_token=1e9, peak_flops=4e12) == pytest.approx(0.25)
    assert peak_tflops_for("cpu") is None


def test_greedy_generation_is_deterministic_and_cropped() -> None:
    torch.manual_seed(0)
    model = GPT(TINY)
    prompt = torch.randint(0, 64, (2, 10))
    out = generate(model, prompt, 12, temperature=0.0)  # runs past max_seq_len=16
    assert out.shape == (2, 22) and torch.equal(out[:, :10], prompt)
    assert torch.equal(out, generate(model, prompt, 12, temperature=0.0))
    first = model(prompt)[:, -1].argmax(-1)
    assert torch.equal(out[:, 10], first)


def test_sampling_respects_top_k_and_generator() -> None:
    torch.manual_seed(0)
    model = GPT(TINY)
    prompt = torch.randint(0, 64, (4, 4))
    top1 = generate(model, prompt, 6, temperature=1.0, top_k=1)
    assert torch.equal(top1, generate(model, prompt, 6, temperature=0.0))
    a = generate(model, prompt, 6, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


class _Scripted(torch.nn.Module):
    """A causal LM stub whose row b emits token ``script[b][t]`` at new position t."""

    def __init__(self, script: list[list[int]], vocab: int = 10) -> None:
        super().__init__()
        self.script, self.vocab, self.prompt_len = script, vocab, None
        self.config = GPTConfig(n_layers=1, d_model=8, n_heads=1, d_ff=8, vocab_size=vocab,
                                max_seq_len=64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.prompt_len = self.prompt_len or ids.size(1)
        step = ids.size(1) - self.prompt_len
        logits = torch.zeros(ids.size(0), ids.size(1), self.vocab)
        for b, row in enumerate(self.script):
            logits[b, -1, row[step]] = 1.0
        return logits


def test_generation_stops_when_every_row_hit_eos() -> None:
    eos = 9
    model = _Scripted([[1, eos, 3, 4, 5, 6], [2, 2, 2, eos, 7, 7]]).train()
    out = generate(model, torch.zeros(2, 3, dtype=torch.long), 6, temperature=0.0, eos_id=eos)
    assert out[:, 3:].tolist() == [[1, eos, eos, eos], [2, 2, 2, eos]]  # stopped after 4 of 6
    assert model.training  # mode restored


@pytest.mark.parametrize("hidden_dropout", [False, True])
def test_gated_mlp_drops_the_hidden_state_only_when_asked(hidden_dropout: bool) -> None:
    """Llama's SwiGLU drops only its output; T5's gated GELU also its hidden state."""
    from megatrain.models.common.layers import GatedMLP

    torch.manual_seed(0)
    mlp = GatedMLP(8, 16, dropout=0.5, hidden_dropout=hidden_dropout).train()
    x = torch.randn(4, 8)
    torch.manual_seed(1)
    got = mlp(x)
    torch.manual_seed(1)
    h = torch.nn.functional.silu(mlp.gate(x)) * mlp.fc(x)
    if hidden_dropout:
        h = torch.nn.functional.dropout(h, 0.5)
    torch.testing.assert_close(got, torch.nn.functional.dropout(mlp.proj(h), 0.5))
