"""T5 v1.1: sizes, relative positions, init, FLOPs, bf16, and parity with Hugging Face's
T5ForConditionalGeneration (logits with padding, export, greedy generation)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from megatrain.data.prepare.train_tokenizer import train_tokenizer
from megatrain.errors import ConfigError
from megatrain.models import build_model, generate, get_model_spec, resolve_model_config
from megatrain.models.t5 import (
    T5,
    T5Config,
    relative_position_bucket,
    span_target_ratio,
    t5_flops_per_token,
)
from megatrain.models.t5.hf import (
    state_dict_to_hf,
    t5_config_from_hf,
    t5_config_to_hf,
)
from megatrain.training.transforms import apply_transforms

transformers = pytest.importorskip("transformers")
from transformers.models.t5.modeling_t5 import T5Attention

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
# Asymmetric stacks, head_dim * n_heads != d_model, few buckets with a short max distance (so
# sequences of 30 reach the logarithmic and the clipped buckets), eps != HF's default.
CONFIG = T5Config(n_layers=2, n_decoder_layers=3, d_model=48, n_heads=4, head_dim=16, d_ff=96,
                  vocab_size=101, max_seq_len=64, relative_buckets=8, relative_max_distance=20,
                  norm_eps=1e-5, attn_impl="sdpa")
SYMMETRIC = dataclasses.replace(CONFIG, n_decoder_layers=2)  # HF's cache needs equal stacks
PUBLISHED = {"t5-small": 76_961_152, "t5-base": 247_577_856, "t5-large": 783_150_080}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(B: int = 3, S: int = 30, T: int = 12) -> dict[str, torch.Tensor]:
    """Random tokens with padding on both sides: encoder rows unpadded, right- and left-padded;
    decoder rows likewise (causal attention never sees right padding, so left padding is what
    tests the decoder's mask)."""
    g = _gen(1)
    attention_mask = torch.ones(B, S, dtype=torch.long)
    attention_mask[1, S - 9:] = 0
    attention_mask[2, :5] = 0
    decoder_attention_mask = torch.ones(B, T, dtype=torch.long)
    decoder_attention_mask[1, T - 4:] = 0
    decoder_attention_mask[2, :3] = 0
    return {"input_ids": torch.randint(0, CONFIG.vocab_size, (B, S), generator=g),
            "decoder_input_ids": torch.randint(0, CONFIG.vocab_size, (B, T), generator=g),
            "attention_mask": attention_mask, "decoder_attention_mask": decoder_attention_mask}


@torch.no_grad()
def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """Init sets every norm to 1, which would hide a swapped norm: make each one different."""
    g = _gen(seed)
    for name, p in model.named_parameters():
        if "layer_norm" in name or "ln_" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


def _untie_head(hf: torch.nn.Module, seed: int) -> None:
    """transformers 5 builds every T5 with ``lm_head`` tied to ``shared`` (it unties only when
    loading a checkpoint that holds both): give the head its own random weights, as v1.1 has."""
    g = _gen(seed)
    hf.lm_head.weight = torch.nn.Parameter(torch.randn(hf.lm_head.weight.shape, generator=g))
    hf.all_tied_weights_keys.pop("lm_head.weight", None)


def _hf_model(config: T5Config = CONFIG, seed: int = 0) -> transformers.T5ForConditionalGeneration:
    torch.manual_seed(seed)
    hf = transformers.T5ForConditionalGeneration._from_config(t5_config_to_hf(config),
                                                              attn_implementation="eager")
    _randomize_norms(hf, seed)
    _untie_head(hf, seed)
    return hf.eval()


def _hf_logits(hf: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return hf(**batch).logits


def _assert_real_positions_close(actual: torch.Tensor, expected: torch.Tensor,
                                 decoder_attention_mask: torch.Tensor) -> None:
    real = decoder_attention_mask.bool()
    assert (actual[real] - expected[real]).abs().max().item() <= 1e-4
    assert expected.abs().max() > 1.0  # not trivially small logits


# --- relative positions -----------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (64, 300)])
def test_relative_buckets_equal_hf(bidirectional: bool, num_buckets: int,
                                   max_distance: int) -> None:
    relative = torch.arange(-1000, 1001)[None, :] - torch.arange(0, 3)[:, None]  # (3, 2001)
    ours = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(relative, bidirectional=bidirectional,
                                                   num_buckets=num_buckets,
                                                   max_distance=max_distance)
    assert torch.equal(ours, theirs)
    # every bucket is reached but "0 positions after" (bidirectional: it is "0 positions before")
    used = num_buckets - 1 if bidirectional else num_buckets
    assert ours.unique().numel() == used and ours.min() == 0


def test_bias_is_shared_by_the_stack_and_computed_for_any_length() -> None:
    model = T5(CONFIG)
    bias = model.encoder.rel_bias(700, 700)  # far beyond max_seq_len: no hard limit
    assert bias.shape == (1, CONFIG.n_heads, 700, 700)
    assert torch.equal(bias[0, :, 5, 3], model.encoder.rel_bias.weight[2])  # 2 before: bucket 2
    assert not any("rel_bias" in n for n, _ in model.encoder.blocks.named_parameters())


# --- parity with transformers ---------------------------------------------------------------

def test_config_round_trips() -> None:
    hf = t5_config_to_hf(CONFIG)
    assert (hf.num_layers, hf.num_decoder_layers, hf.d_model, hf.d_kv, hf.num_heads) == (
        2, 3, 48, 16, 4)
    assert hf.feed_forward_proj == "gated-gelu" and hf.decoder_start_token_id == 3
    assert t5_config_from_hf(hf) == dataclasses.replace(CONFIG, attn_impl="auto")


def test_generation_stops_at_eos_and_keeps_the_gpt_contract() -> None:
    model = T5(CONFIG)
    prompt = _batch(S=6)["input_ids"]
    first = generate(model, prompt, 1, temperature=0.0)[:, 0]
    out = generate(model, prompt, 20, temperature=0.0, eos_id=int(first[0]))
    assert out.size(1) <= 20 and (out[0] == first[0]).all()
    assert model.training  # put back in the mode it was in


# --- export through a checkpoint --------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = Path(json.__file__).read_text()[:8000]
    return train_tokenizer([corpus], tmp_path_factory.mktemp("tok") / "tokenizer.model", 512)


# --- sizes, config, FLOPs ---------------------------------------------------------------------

def test_t5_small_has_v1_1_shapes() -> None:
    config = resolve_model_config({"family": "t5", "size": "t5-small"}, 32128)
    assert (config.n_layers, config.n_decoder_layers, config.d_model, config.n_heads,
            config.head_dim, config.d_ff) == (8, 8, 512, 6, 64, 1024)
    assert (config.tie_embeddings, config.relative_buckets, config.decoder_start_id) == (
        False, 32, 3)


def test_every_size_has_a_yaml() -> None:
    shipped = sorted(p.stem for p in CONFIGS.glob("t5-*.yaml"))
    assert shipped == sorted(get_model_spec("t5").sizes)
    for name in shipped:
        cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert cfg == {"family": "t5", "size": name}


def test_none_means_the_size_default_and_head_dim_defaults_to_d_model_over_heads() -> None:
    cfg = {"family": "t5", "size": "t5-tiny", "head_dim": None, "n_decoder_layers": None,
           "tie_embeddings": None, "n_kv_heads": None}
    assert resolve_model_config(cfg, 100).head_dim == 32
    dims = {"family": "t5", "size": None, "n_layers": 3, "d_model": 64, "n_heads": 8,
            "d_ff": 128, "max_seq_len": 32}
    config = resolve_model_config(dims, 100)
    assert (config.head_dim, config.n_decoder_layers) == (8, 3)


@pytest.mark.parametrize("override, message", [
    ({"size": None, "n_layers": 1, "d_model": 100, "n_heads": 6, "d_ff": 8, "max_seq_len": 8},
     "not divisible by model.n_heads=6; set model.head_dim"),
    ({"n_decoder_layers": 0}, "n_decoder_layers=0 must be a positive integer"),
    ({"relative_max_distance": 8}, "relative_max_distance > relative_buckets / 4"),
    ({"n_kv_heads": 2}, "model.n_kv_heads is not a setting of the t5 family"),
    ({"attn_impl": "flash_attn"}, "flash_attn: cannot add an attention bias"),
])
def test_bad_t5_configs_are_config_errors(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model({"family": "t5", "size": "t5-tiny", **override}, 100)


@pytest.mark.parametrize("change, message", [
    ({"feed_forward_proj": "relu"}, "feed_forward_proj=relu is not supported"),
    ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj=gated-silu is not supported"),
])
def test_unsupported_hf_t5_configs_are_config_errors(change: dict, message: str) -> None:
    hf = t5_config_to_hf(CONFIG).to_dict()
    hf.update(change)
    hf.pop("is_gated_act", None), hf.pop("dense_act_fn", None)  # derived from the projection
    with pytest.raises(ConfigError, match=message):
        t5_config_from_hf(transformers.T5Config(**hf))


def test_flops_per_input_token() -> None:
    c = CONFIG
    assert span_target_ratio() == pytest.approx(0.2 / 0.9)
    r, S, d, inner, ff = 0.25, 40, 48, 64, 96
    encoder = 2 * (4 * d * inner + 3 * d * ff) + 3 * 2 * d * inner  # + cross k, v
    decoder = 3 * (6 * d * inner + 3 * d * ff) + 101 * d  # self + cross q, o; head
    scores = 12 * inner * (2 * S + r * 3 * (r * S + S))
    assert t5_flops_per_token(c, S, decoder_ratio=r) == pytest.approx(
        6 * (encoder + r * decoder) + scores)
    assert get_model_spec("t5").flops_per_token(c, S) == t5_flops_per_token(
        c, S, decoder_ratio=span_target_ratio())


# --- behaviour, init, training ----------------------------------------------------------------

def test_decoder_is_causal_and_encoder_bidirectional() -> None:
    model = T5(CONFIG).eval()
    batch = {k: v for k, v in _batch().items() if "mask" not in k}
    later = {**batch, "decoder_input_ids": batch["decoder_input_ids"].clone()}
    later["decoder_input_ids"][:, 6:] = (later["decoder_input_ids"][:, 6:] + 1) % 101
    last = {**batch, "input_ids": batch["input_ids"].clone()}
    last["input_ids"][:, -1] = (last["input_ids"][:, -1] + 1) % 101
    with torch.no_grad():
        base, a, b = model(**batch), model(**later), model(**last)
    torch.testing.assert_close(a[:, :6], base[:, :6], atol=1e-5, rtol=0)
    assert (a[:, 6:] - base[:, 6:]).abs().max() > 1e-3
    assert (b[:, 0] - base[:, 0]).abs().max() > 1e-3  # the last input reaches the first output


def test_init_matches_hf_init_statistics() -> None:
    config = T5Config(n_layers=2, d_model=256, n_heads=4, head_dim=32, d_ff=512, vocab_size=300,
                      max_seq_len=64)
    torch.manual_seed(0)
    ours = state_dict_to_hf(T5(config).state_dict())
    hf = transformers.T5ForConditionalGeneration(t5_config_to_hf(config)).state_dict()
    for name, tensor in hf.items():
        if name.endswith("relative_attention_bias.weight") and "EncDecAttention" in name:
            continue
        std = tensor.float().std().item()
        if name == "lm_head.weight":
            std = 1.0  # built tied to ``shared`` by transformers 5; HF's untied init is N(0, 1)
        assert ours[name].float().std().item() == pytest.approx(std, rel=0.15), name
        if "layer_norm" in name:
            assert torch.equal(ours[name], tensor)


def test_blocks_are_a_plain_list_and_checkpointing_keeps_gradients() -> None:
    torch.manual_seed(0)
    model = T5(CONFIG)
    assert isinstance(model.blocks, list) and len(model.blocks) == 5
    assert len(model.state_dict()) == len(set(model.state_dict()))
    assert not any(k.startswith("blocks.") for k in model.state_dict())
    wrapped = apply_transforms(copy.deepcopy(model), activation_checkpointing=True, compile=False)
    batch = _batch()
    for m in (model, wrapped):
        m.train()
        m(**batch).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert model.encoder.rel_bias.weight.grad.abs().max() > 0


def test_bf16_trains_and_stays_finite() -> None:
    """bf16 weights and activations as DeepSpeed's bf16 mode runs them; the loss falls."""
    torch.manual_seed(0)
    model, _, _ = build_model({"family": "t5", "size": "t5-tiny", "max_seq_len": 64}, 128,
                              dtype=torch.bfloat16)
    assert model.attn_impl == "sdpa" and model.tok_emb.weight.dtype == torch.bfloat16
    g = _gen(0)
    inputs = torch.randint(4, 128, (4, 32), generator=g)
    labels = torch.randint(4, 128, (4, 8), generator=g)
    decoder_inputs = torch.cat([torch.full((4, 1), 3), labels[:, :-1]], dim=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        logits = model(inputs, decoder_inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.2 * losses[0]
