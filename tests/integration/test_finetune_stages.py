"""Staged fine-tuning as real runs (DeepSpeed, one or two processes): a 4-block GPT fine-tuned
from a checkpoint keeps every weight outside the top 2 blocks and the head bit-identical while
``top:2`` trains — under ZeRO 0, 2 and 3 —, and a run stopped inside stage 1 and resumed
through stage 2 ends bit-identical to one that never stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatrain.training.checkpoint import load_model_weights
from tests.integration.helpers import losses, train

pytestmark = pytest.mark.integration
FOUR = ("model.n_layers=4", "optim.lr=3e-3", "trainer.log_every=1", "trainer.eval_every=1000",
        "trainer.eval_steps=1", "schedule.warmup_steps=1", "data.num_workers=0")
STAGES = "finetune.stages=[{steps:6,trainable:'top:2'},{trainable:all}]"


def _on_top(name: str) -> bool:
    """In the top 2 of 4 blocks or above them (the final norm; GPT-2's LM head is the token
    embedding, which stays frozen)."""
    return name.startswith(("blocks.2.", "blocks.3.", "ln_f."))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    """A 4-block GPT pretrained for 2 steps: the checkpoint the fine-tunes start from."""
    run = tmp_path_factory.mktemp("finetune") / "base"
    train(run, prepared_dir, *FOUR, "trainer.max_steps=2")
    return run / "checkpoints" / "step_2"


def _assert_top_trained_only(ckpt: Path, start: dict[str, torch.Tensor]) -> None:
    weights = load_model_weights(ckpt)
    assert set(weights) >= set(start) - {"lm_head.weight"}
    for name, tensor in weights.items():
        if name in start:  # tied names appear once in some layouts
            assert torch.equal(tensor, start[name]) != _on_top(name), name


@pytest.mark.parametrize("zero", [2, 3])
def test_a_top2_stage_leaves_the_rest_bit_identical(tmp_path: Path, prepared_dir: Path,
                                                    base: Path, zero: int) -> None:
    """On 2 ranks, where ZeRO partitions the flattened groups (ZeRO 0: the resume test)."""
    run = tmp_path / f"zero{zero}"
    result = train(run, prepared_dir, *FOUR, f"model.init_from={base}", "finetune.trainable=top:2",
                   f"deepspeed.zero_stage={zero}", "trainer.max_steps=3", nproc=2)
    assert "finetune: top:2 (" in result.stdout + result.stderr
    _assert_top_trained_only(run / "checkpoints" / "step_3", load_model_weights(base))


def test_resume_inside_stage1_ends_bit_identical(tmp_path: Path, prepared_dir: Path,
                                                 base: Path) -> None:
    """Stages top:2 for 6 steps, then all: a 12-step run, and one stopped at step 4 and resumed
    to 12, log the same losses and end with the same weights, to the bit; at step 6 (ZeRO 0) only
    the top 2 blocks and the head have moved."""
    common = (*FOUR, f"model.init_from={base}", STAGES, "schedule.total_steps=12",
              "trainer.save_every=6")
    whole, split = tmp_path / "whole", tmp_path / "split"
    out = train(whole, prepared_dir, *common, "trainer.max_steps=12")
    assert "finetune: stage 2 from step 6: all (" in out.stdout + out.stderr
    train(split, prepared_dir, *common, "trainer.max_steps=4")
    train(split, prepared_dir, *common, "trainer.max_steps=12", "run.resume=auto")

    reference, resumed = losses(whole), losses(split)
    assert sorted(resumed) == sorted(reference) == list(range(1, 13))
    assert resumed == reference
    start = load_model_weights(base)
    _assert_top_trained_only(whole / "checkpoints" / "step_6", start)
    end, other = (load_model_weights(run / "checkpoints" / "step_12") for run in (whole, split))
    assert all(torch.equal(end[name], other[name]) for name in end)
    assert all(not torch.equal(end[name], start[name]) for name in start if name in end)
