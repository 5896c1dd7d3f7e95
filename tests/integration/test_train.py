"""End-to-end training runs as real processes: exact resume, ZeRO on two ranks, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.helpers import losses, metrics, run_module, train

pytestmark = pytest.mark.integration


def test_resume_continues_bit_identically(tmp_path: Path, prepared_dir: Path) -> None:
    """A 40-step run, and a 20-step run resumed to 40, log identical losses for steps 21-40."""
    common = ("trainer.log_every=1", "trainer.eval_every=1000", "trainer.save_every=20",
              "schedule.warmup_steps=5", "schedule.total_steps=40", "data.num_workers=2")
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(whole, prepared_dir, "trainer.max_steps=40", *common)
    train(split, prepared_dir, "trainer.max_steps=20", *common)
    assert (split / "checkpoints" / "latest").read_text() == "step_20"
    train(split, prepared_dir, "trainer.max_steps=40", "run.resume=auto", *common)

    reference, resumed = losses(whole), losses(split)
    assert sorted(resumed) == list(range(1, 41))  # no step logged twice after the resume
    assert [resumed[s] for s in range(21, 41)] == [reference[s] for s in range(21, 41)]
    assert reference[40] < reference[1]


def test_run_writes_metrics_checkpoints_and_evaluates(tmp_path: Path, prepared_dir: Path) -> None:
    run_dir = tmp_path / "run"
    train(run_dir, prepared_dir, "trainer.max_steps=30", "trainer.log_every=10",
          "trainer.eval_every=15", "trainer.save_every=10", "trainer.keep_last=2",
          "trainer.grad_accum_steps=2")
    rows = metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [10, 20, 30]
    assert [r["step"] for r in eval_rows] == [15, 30]
    for key in ("lr", "grad_norm", "tokens_per_s", "mem_gb", "tokens_seen"):
        assert all(r[key] is not None and r[key] >= 0 for r in train_rows), key
    assert train_rows[-1]["tokens_seen"] == 30 * 2 * 4 * 64
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == ["latest", "step_20", "step_30"]
    assert (run_dir / "config.yaml").exists()


def test_generate_prints_text_from_a_checkpoint(trained_gpt: Path) -> None:
    out = run_module("generate", ["--checkpoint", str(trained_gpt), "--prompt", "KING",
                                  "--max-new-tokens", "20", "--seed", "1"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("KING") and len(out.stdout.strip()) > len("KING")


@pytest.mark.parametrize("override, expected", [
    ("data.train=/nonexistent/corpus", "/nonexistent/corpus"),
    ("model=gpt2-huge", "gpt2-huge"),
    ("model.size=gpt2-huge", "gpt2-huge"),
    ("trainer.max_stepz=10", "max_stepz"),
])
def test_bad_input_fails_fast_with_a_message(tmp_path: Path, prepared_dir: Path, override: str,
                                             expected: str) -> None:
    """Each mistake ends before training with a short message naming it, and exit code != 0."""
    args = [f"data.train={prepared_dir}", f"run.dir={tmp_path / 'run'}", "logger.wandb.mode=disabled",
            override]
    result = run_module("train", args, timeout=120)
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert expected in message
    assert "Traceback" not in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


VALID_EXPERIMENTS = ("valid: bert_cls_quickstart, bert_quickstart, nanogpt_char, quickstart, "
                     "sft_quickstart, t5_quickstart")


@pytest.mark.parametrize("override, message", [
    ("experiment=nope", "error: experiment=nope: no such experiment; " + VALID_EXPERIMENTS),
    ("+experiment=bert_quickstat",
     "error: experiment=bert_quickstat: no such experiment; " + VALID_EXPERIMENTS),
    ("trainer.micro_batch_size=-1", "error: trainer.micro_batch_size=-1: must be >= 1"),
    ("data.mask_prob=1.5", "error: data.mask_prob=1.5: must be in (0, 1]"),
    ("deepspeed.offload_optimizer=true", ("error: deepspeed.offload_optimizer needs ZeRO "
     "(deepspeed.zero_stage=1, 2 or 3): stage 0 keeps no optimizer partitions to offload")),
    ("deepspeed.offload_param=true", ("error: deepspeed.offload_param needs "
     "deepspeed.zero_stage=3 (got 0): only stage 3 partitions the parameters")),
    ("trainer.max_steps=50", ("error: schedule: total steps (50, trainer.max_steps unless "
     "schedule.total_steps is set) must exceed schedule.warmup_steps (100): lower the warmup")),
])
def test_a_bad_choice_or_value_exits_2_with_one_line_before_anything_is_built(
        tmp_path: Path, prepared_dir: Path, override: str, message: str) -> None:
    """As a user types it: exit 2 (a config error, not worth a retry), one line on stderr,
    nothing on stdout, and nothing in the run folder (Hydra makes it before the range check
    runs): no model, data or process group was made."""
    result = run_module("train", [f"data.train={prepared_dir}", f"run.dir={tmp_path / 'run'}",
                                  "logger.wandb.mode=disabled", override], timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [message] and result.stdout == ""
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())
