"""The memory planner: its formulas by hand, how stages / offload / world size move memory,
fits or not, activations against the tensors autograd really saves, and ``megatrain-plan``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from megatrain.cli.plan import main
from megatrain.config.compose import compose_config
from megatrain.errors import ConfigError
from megatrain.models.gpt2.model import GPTConfig
from megatrain.models.registry import get_model_spec, resolve_model_config
from megatrain.training.engine import build_optimizer
from megatrain.training.memory_plan import (
    GB,
    activation_bytes,
    model_param_groups,
    param_groups,
    plan_from_config,
    plan_memory,
    stage3_subgroups,
    zero12_partition,
)
from megatrain.training.transforms import apply_transforms

# Counted by hand: tok_emb 16·8 = 128, pos_emb 8·8 = 64; the block's matrices qkv 8·24 = 192,
# proj 64, fc 8·32 = 256, proj 256 (the tied head is the embedding); its vectors ln_1 8 + 8, qkv
# bias 24, proj bias 8, ln_2 8 + 8, fc bias 32, proj bias 8; ln_f 8 + 8.
SMALL = GPTConfig(n_layers=1, d_model=8, n_heads=2, d_ff=32, vocab_size=16, max_seq_len=8)
MATRICES = [128, 64, 192, 64, 256, 256]
VECTORS = [8, 8, 24, 8, 8, 8, 32, 8, 8, 8]
PSI = 1080  # = 960 + 120
N_TENSORS = 16


def _plan(config=SMALL, family: str = "gpt", **kw):
    args = {"zero_stage": 0, "offload_optimizer": False, "offload_param": False,
            "precision": "fp32", "micro_batch_size": 2, "seq_len": 8, "world_size": 1,
            "activation_checkpointing": False, "vocab_size": 16}
    return plan_memory(config, family, **(args | kw))


def _states(plan) -> tuple[int, int, int]:
    return tuple(plan.state_bytes(row) for row in ("parameters", "gradients", "optimizer"))


# --- the parameter layout -------------------------------------------------------------------


def test_groups_of_the_small_model_are_counted_by_hand() -> None:
    assert model_param_groups(SMALL, "gpt") == [MATRICES, VECTORS]
    assert sum(MATRICES) + sum(VECTORS) == PSI


@pytest.mark.parametrize("family, size", [("gpt", "gpt2-tiny"), ("llama", "llama-tiny"),
                                          ("bert", "bert-tiny"), ("t5", "t5-tiny")])
def test_groups_are_the_engines_optimizer_groups(family: str, size: str) -> None:
    """The planner's copy of build_optimizer's grouping may not drift from it."""
    config = resolve_model_config({"family": family, "size": size}, 100)
    model = get_model_spec(family).build(config, "cpu", torch.float32)
    cfg = OmegaConf.create({"optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1,
                                      "betas": [0.9, 0.95], "eps": 1e-8}})
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    expected = [[p.numel() for p in g["params"]] for g in optimizer.param_groups if g["params"]]
    assert param_groups(model) == expected


def test_zero12_slices_by_hand() -> None:
    """N=2: the 960-element group splits at 480, inside fc's weight (448..704)."""
    group = zero12_partition(MATRICES, 2)
    assert (group.padded, group.part) == (960, 480)
    assert group.touched == (704, 512)  # rank 0 touches 5 matrices whole, rank 1 fc and proj
    assert group.pieces == (5, 2)
    vectors = zero12_partition(VECTORS, 2)  # ln_2's bias (56..64) straddles 60
    assert (vectors.part, vectors.touched) == (60, (64, 64))
    padded = zero12_partition([5], 2)  # padded to 2N = 4 → 8, slices of 4
    assert (padded.padded, padded.part, padded.touched, padded.pieces) == (8, 4, (5, 5), (1, 2))


def test_stage3_subgroups_split_at_a_billion_elements() -> None:
    assert stage3_subgroups([MATRICES, VECTORS], 2) == [480, 60]
    big = [600_000_000] * 8  # partitions of 300M: a sub-group closes once it reaches 1e9
    assert stage3_subgroups([big], 2) == [1_200_000_000, 1_200_000_000]


# --- model states by hand -------------------------------------------------------------------


def test_stage0_fp32_by_hand() -> None:
    """The ZeRO paper's fp32 accounting: 4Ψ + 4Ψ + 8Ψ (+ AdamW's fp32 step per tensor)."""
    assert _states(_plan()) == (4 * PSI, 4 * PSI, 8 * PSI + 4 * N_TENSORS)


def test_stage0_bf16_keeps_unpartitioned_masters_and_fp32_gradient_copies() -> None:
    """Paper: 2Ψ + 2Ψ + 12Ψ; DeepSpeed's unfused optimizer adds 4Ψ of fp32 gradients in step."""
    assert _states(_plan(precision="bf16")) == (2 * PSI, (2 + 4) * PSI,
                                                12 * PSI + 4 * N_TENSORS)


def test_stage2_fp32_by_hand() -> None:
    """Rank 0 is the busiest: whole gradients of 704 + 64 elements, plus an fp32 copy of its
    480-element slice (made of 5 pieces); master + m + v: 12 bytes × (480 + 60)."""
    plan = _plan(zero_stage=2, world_size=2)
    assert _states(plan) == (4 * PSI, 4 * (704 + 64) + 4 * 480, 12 * 540 + 4 * 2)
    assert plan.gpu["overhead"] == 2 * 4 * 500_000_000 + 1_000_000_000  # 2 buckets + context


def test_stage3_fp32_by_hand() -> None:
    """Partitions of Ψ/2 plus every parameter whole (all are under 1e5 elements); gradient
    partitions plus an fp32 copy of the larger sub-group (480); 12 bytes × 540."""
    assert _states(_plan(zero_stage=3, world_size=2)) == (4 * 540 + 4 * PSI, 4 * 540 + 4 * 480,
                                                          12 * 540 + 4 * 2)


def test_large_world_approaches_the_zero_paper() -> None:
    """gpt2-medium, bf16, 64 ranks: stage 3's optimizer is the paper's 12Ψ/N; its parameters
    2Ψ/N plus whole copies of the norm and bias vectors (24 layers × 13,312 + ln_f's 2,048),
    which at this N are 6% more than the paper's figure."""
    config = resolve_model_config({"family": "gpt", "size": "gpt2-medium"}, 50257)
    plan = _plan(config, precision="bf16", zero_stage=3, world_size=64, vocab_size=50257)
    psi = plan.n_params
    assert plan.state_bytes("optimizer") == pytest.approx(12 * psi / 64, rel=0.001)
    persistent = 24 * (4 * 1024 + 3072 + 1024 + 4096 + 1024) + 2 * 1024
    assert plan.state_bytes("parameters") == pytest.approx(2 * psi / 64 + 2 * persistent,
                                                           rel=0.001)


# --- what stages, offload and world size change ---------------------------------------------


@pytest.fixture(scope="module")
def medium():
    return resolve_model_config({"family": "gpt", "size": "gpt2-medium"}, 50257)


def test_each_stage_holds_less(medium) -> None:
    totals = [sum(_states(_plan(medium, zero_stage=s, world_size=8, precision="bf16",
                                vocab_size=50257))) for s in (0, 1, 2, 3)]
    assert totals[0] > 3 * totals[1] and totals[1] >= totals[2] > 1.5 * totals[3], totals


def test_offload_moves_states_to_the_host(medium) -> None:
    kw = {"world_size": 8, "precision": "bf16", "vocab_size": 50257}
    on_gpu = _plan(medium, zero_stage=2, **kw)
    offloaded = _plan(medium, zero_stage=2, offload_optimizer=True, **kw)
    assert offloaded.gpu["optimizer"] == offloaded.gpu["gradients"] == 0
    assert offloaded.cpu["optimizer"] == on_gpu.gpu["optimizer"]
    assert offloaded.cpu["gradients"] > 0 and offloaded.total < on_gpu.total
    params_off = _plan(medium, zero_stage=3, offload_optimizer=True, offload_param=True, **kw)
    persistent_only = params_off.gpu["parameters"]
    assert 0 < persistent_only < 0.01 * params_off.cpu["parameters"] * 8


def test_more_ranks_divide_the_optimizer(medium) -> None:
    four, eight = (_plan(medium, zero_stage=2, world_size=n, precision="bf16",
                         vocab_size=50257) for n in (4, 8))
    assert four.gpu["optimizer"] == pytest.approx(2 * eight.gpu["optimizer"], rel=1e-4)
    assert four.gpu["parameters"] == pytest.approx(eight.gpu["parameters"], rel=1e-4)


def test_stage1_holds_full_gradients_while_accumulating(medium) -> None:
    kw = {"zero_stage": 1, "world_size": 8, "precision": "bf16", "vocab_size": 50257}
    once, accumulating = _plan(medium, **kw), _plan(medium, grad_accum_steps=4, **kw)
    assert accumulating.gpu["gradients"] == 2 * once.n_params > once.gpu["gradients"]
    stage2 = _plan(medium, grad_accum_steps=4, **(kw | {"zero_stage": 2}))
    assert stage2.gpu["gradients"] == once.gpu["gradients"]


# --- fits -----------------------------------------------------------------------------------


def test_fits_compares_the_total_with_the_gpu(medium) -> None:
    plan = _plan(medium, zero_stage=2, world_size=8, precision="bf16", vocab_size=50257,
                 seq_len=1024, micro_batch_size=4, gpu_gb=80)
    assert plan.fits is True
    exact = plan.total / GB
    assert plan_memory(medium, "gpt", **_kw(plan, gpu_gb=exact)).fits is True
    assert plan_memory(medium, "gpt", **_kw(plan, gpu_gb=exact * 0.999)).fits is False
    assert _plan(medium).fits is None  # no GPU size given


def _kw(plan, **changes):
    return {"zero_stage": plan.zero_stage, "offload_optimizer": False, "offload_param": False,
            "precision": plan.precision, "micro_batch_size": plan.micro_batch_size,
            "seq_len": plan.seq_len, "world_size": plan.world_size,
            "activation_checkpointing": False, "vocab_size": 50257} | changes


def test_llama_7b_without_zero_does_not_fit_80gb() -> None:
    cfg = compose_config(["model=llama-7b", "model.vocab_size=32000", "data.seq_len=2048",
                          "trainer.micro_batch_size=1", "deepspeed=zero0"])
    plan = plan_from_config(cfg, world_size=8, gpu_gb=80)
    assert plan.n_params == 6_738_415_616  # Llama-2-7B
    assert plan.fits is False
    assert plan.gpu["optimizer"] == pytest.approx(12 * plan.n_params, rel=1e-6)
    cfg3 = compose_config(["model=llama-7b", "model.vocab_size=32000", "data.seq_len=2048",
                           "trainer.micro_batch_size=1", "deepspeed=zero3",
                           "trainer.activation_checkpointing=true"])
    assert plan_from_config(cfg3, world_size=8, gpu_gb=80).fits is True


# --- activations ----------------------------------------------------------------------------


def test_activations_by_hand() -> None:
    """A GPT-2 block keeps 9d + 2·d_ff = 17d values per token (34 bytes·d in bf16, Korthikanti
    et al.'s figure); the head ln_f's and lm_head's inputs; the loss (b + 12) bytes per logit."""
    acts = activation_bytes(SMALL, "gpt", precision="fp32", micro_batch_size=2, seq_len=8)
    tokens = 16
    assert acts.blocks == tokens * 17 * 8 * 4
    assert (acts.recompute, acts.head, acts.loss) == (0, tokens * 2 * 8 * 4, tokens * 16 * 16)
    bf16 = activation_bytes(SMALL, "gpt", precision="bf16", micro_batch_size=2, seq_len=8)
    assert bf16.blocks == 34 * 8 * tokens * SMALL.n_layers


def test_checkpointing_keeps_block_inputs_and_one_block() -> None:
    full = activation_bytes(SMALL, "gpt", precision="fp32", micro_batch_size=2, seq_len=8)
    ckpt = activation_bytes(SMALL, "gpt", precision="fp32", micro_batch_size=2, seq_len=8,
                            activation_checkpointing=True)
    assert ckpt.blocks == 16 * 8 * 4 and ckpt.recompute == full.blocks  # one layer: both
    assert (ckpt.head, ckpt.loss) == (full.head, full.loss)


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for the backward (parameters aside)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return sum(saved.values())


@pytest.mark.parametrize("family, size", [("gpt", "gpt2-tiny"), ("llama", "llama-tiny"),
                                          ("bert", "bert-tiny")])
@pytest.mark.parametrize("precision, ckpt", [("fp32", False), ("bf16", False), ("fp32", True)])
def test_activations_match_what_autograd_saves(family: str, size: str, precision: str,
                                               ckpt: bool) -> None:
    """The blocks' and head's estimate against the tensors a real forward saves (CPU: SDPA's
    fused kernel, like FlashAttention no s² scores), within 10%. T5 is left out: on a CPU its
    biased attention runs the math kernel, which keeps the scores."""
    config = resolve_model_config({"family": family, "size": size}, 1000)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = apply_transforms(get_model_spec(family).build(config, "cpu", dtype), ckpt, False)
    B, T = 2, 128
    got = _saved_bytes(model, torch.randint(0, 1000, (B, T)))
    acts = activation_bytes(config, family, precision=precision, micro_batch_size=B, seq_len=T,
                            activation_checkpointing=ckpt)
    assert acts.blocks + acts.head == pytest.approx(got, rel=0.10)


# --- refused setups -------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"zero_stage": 4}, "zero_stage=4"),
    ({"offload_optimizer": True}, "offload_optimizer needs ZeRO"),
    ({"zero_stage": 2, "offload_param": True}, "offload_param needs"),
    ({"precision": "fp8"}, "fp8"),
    ({"world_size": 0}, "world size 0"),
])
def test_impossible_setups_are_config_errors(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _plan(**changes)


# --- the command ----------------------------------------------------------------------------


def test_command_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["model=gpt2-small", "deepspeed=zero2", "trainer.micro_batch_size=8",
                 "data.seq_len=1024", "--world-size", "8", "--gpu-gb", "80"])
    out = capsys.readouterr().out
    assert code == 0
    for row in ("parameters", "gradients", "optimizer", "activations", "overhead", "total",
                "fits 80 GB?"):
        assert row in out, out
    assert "ZeRO-2, bf16, 8 rank(s)" in out and "yes," in out
    assert "data.vocab_size" in out  # the plan says which vocabulary it assumed


def test_command_says_when_it_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["model=llama-7b", "model.vocab_size=32000", "deepspeed=zero2-offload",
                 "--world-size", "8", "--gpu-gb", "24", "-v"])
    out = capsys.readouterr().out
    assert code == 0 and "NO," in out
    assert "host, per rank (offload)" in out and "fp32 gradient slice" in out


@pytest.mark.parametrize("argv", [["trainer.max_stepz=3"], ["model.size=gpt2-huge"],
                                  ["trainer.micro_batch_size=many"], ["--world-size", "0"],
                                  ["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"],
                                  ["--gpu-gb", "-1"]])
def test_bad_overrides_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "config error:" in capsys.readouterr().err


def test_runs_as_a_module() -> None:
    result = subprocess.run([sys.executable, "-m", "megatrain.plan", "model=bert-base",
                             "deepspeed=zero3", "--world-size", "4"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "ZeRO-3" in result.stdout and "total" in result.stdout


@pytest.mark.parametrize("model", ["gpt2-tiny", "llama-1b", "bert-large", "t5-small"])
def test_shipped_models_plan(model: str) -> None:
    plan = plan_from_config(compose_config([f"model={model}"]), world_size=2, gpu_gb=80)
    assert plan.total > plan.gpu["activations"] > 0 and plan.n_params > 0
