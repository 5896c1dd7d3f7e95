"""The memory planner against what DeepSpeed really allocates: 2 ranks (torchrun, gloo, DeepSpeed
on CPU), every ZeRO stage, offload, bf16 and gradient accumulation, one probe run for all cases
(tests/integration/planner_probe.py measures; the planner must agree within 5%)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module

from megatrain.config import register_configs
from megatrain.training.memory_plan import plan_from_config
from tests.integration.helpers import REPO, _free_port, env_for_tests

pytestmark = pytest.mark.integration

# gpt2-tiny dims from helpers.TINY: the 4096 × 64 embedding is two thirds of the model, so ZeRO's
# slice boundaries fall inside it and the per-rank layout matters. Small reduce buckets keep the
# processes small (DeepSpeed allocates them whole).
GPT = ["model=gpt2-tiny", "model.n_layers=2", "model.d_model=64", "model.n_heads=2",
       "model.d_ff=256", "data.seq_len=64", "trainer.micro_batch_size=4",
       "deepspeed.reduce_bucket_size=100000"]
# Llama-style: untied head, grouped-query attention, no biases, a vocabulary that does not
# split evenly.
LLAMA = ["model=llama-tiny", "model.n_layers=2", "model.d_model=64", "model.n_heads=4",
         "model.n_kv_heads=2", "model.d_ff=160", "model.vocab_size=1000", "data.seq_len=64",
         "trainer.micro_batch_size=4", "deepspeed.reduce_bucket_size=100000"]
# BERT: post-norm blocks, the MLM head's dense layer and a decoder bias beside the tied weight.
BERT = ["model=bert-tiny", "model.n_layers=2", "model.d_model=64", "model.n_heads=2",
        "model.d_ff=256", "data.seq_len=64", "trainer.micro_batch_size=4",
        "deepspeed.reduce_bucket_size=100000"]
FP32, BF16 = ["trainer.precision=fp32"], ["trainer.precision=bf16"]
# ZeRO-3 patches torch globally (its memory-efficient linear), so its cases run last.
CASES = {
    "fp32-zero0": GPT + FP32 + ["deepspeed=zero0"],
    "fp32-zero1": GPT + FP32 + ["deepspeed=zero1"],
    "fp32-zero1-accum2": GPT + FP32 + ["deepspeed=zero1", "trainer.grad_accum_steps=2"],
    "fp32-zero2": GPT + FP32 + ["deepspeed=zero2"],
    "fp32-zero2-offload": GPT + FP32 + ["deepspeed=zero2-offload"],
    "fp32-zero2-bert": BERT + FP32 + ["deepspeed=zero2"],
    "bf16-zero0": GPT + BF16 + ["deepspeed=zero0"],
    "bf16-zero1": GPT + BF16 + ["deepspeed=zero1"],
    "bf16-zero2-llama": LLAMA + BF16 + ["deepspeed=zero2"],
    "fp32-zero3": GPT + FP32 + ["deepspeed=zero3"],
    "fp32-zero3-offload": GPT + FP32 + ["deepspeed=zero3-offload"],
    "fp32-zero3-offload-optimizer": GPT + FP32 + ["deepspeed=zero3",
                                                  "deepspeed.offload_optimizer=true"],
    "bf16-zero3-llama": LLAMA + BF16 + ["deepspeed=zero3"],
}
ROWS = ("parameters", "gradients", "optimizer")
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, int]]]:
    """{case: [rank 0's measurement, rank 1's]} from one 2-rank probe run."""
    tmp = tmp_path_factory.mktemp("planner")
    (tmp / "cases.json").write_text(json.dumps(CASES))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "tests.integration.planner_probe",
           str(tmp / "cases.json"), str(tmp / "out")]
    result = subprocess.run(cmd, cwd=REPO, env=env_for_tests(), capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {case: [r[case] for r in ranks] for case in CASES}


def _plan(overrides: list[str]):
    register_configs()
    with initialize_config_module("megatrain.configs", version_base=None):
        cfg = compose("config", overrides=overrides)
    return plan_from_config(cfg, world_size=2)


@pytest.mark.parametrize("case", list(CASES))
def test_planned_model_states_match_measured(case: str,
                                             measured: dict[str, list[dict[str, int]]]) -> None:
    """Parameters, gradients and optimizer states of the busiest rank, wherever they live."""
    plan = _plan(CASES[case])
    for row in ROWS:
        got = max(rank[row] for rank in measured[case])
        planned = plan.state_bytes(row)
        assert got > 0, (case, row)
        assert abs(planned - got) <= TOLERANCE * got, (
            f"{case} {row}: planned {planned:,} bytes, measured {got:,} "
            f"(per rank {[rank[row] for rank in measured[case]]})")


@pytest.mark.parametrize("case", list(CASES))
def test_nothing_big_escapes_the_measurement(case: str,
                                             measured: dict[str, list[dict[str, int]]]) -> None:
    """Every live tensor at the optimizer step is a parameter, gradient, optimizer state or a
    known DeepSpeed buffer (else the comparison above could be missing an allocation). Stage 0's
    all-reduce flattening buffer is the one exception: the probe cannot reach it, and in about
    one run in five it is still alive at the step (what holds it was not found); the plan counts
    it in the overhead, so up to its size is allowed."""
    plan = _plan(CASES[case])
    flattening = sum(i.nbytes for i in plan.items if "all-reduce" in i.what)
    for rank in measured[case]:
        held = sum(rank[row] for row in (*ROWS, "buffers"))
        assert rank["unattributed"] <= 0.01 * held + flattening, (case, rank)


def test_zero2_ranks_differ_as_planned(measured: dict[str, list[dict[str, int]]]) -> None:
    """The embedding straddles the slices: rank 1's gradient buffer holds far more than rank 0's,
    which is why the plan reports the busiest rank rather than the paper's even Ψ/N."""
    ranks = [rank["gradients"] for rank in measured["fp32-zero2"]]
    assert ranks[1] > 1.5 * ranks[0], ranks
