"""``model.init_from``: continued pretraining from a megatrain checkpoint or a Hugging Face
directory starts where that model stood, not from a random init."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.helpers import losses, metrics, run_module, train

pytestmark = pytest.mark.integration

STEPS = ("trainer.log_every=1", "trainer.eval_every=1000", "trainer.save_every=1000")


def test_init_from_checkpoint_and_hf_start_where_the_model_stood(
        tmp_path: Path, prepared_dir: Path, trained_gpt: Path) -> None:
    trained_eval = [r["eval_loss"] for r in metrics(trained_gpt) if "eval_loss" in r][-1]
    export = run_module("export", ["--checkpoint", str(trained_gpt),
                                   "--out", str(tmp_path / "hf")])
    assert export.returncode == 0, export.stderr[-3000:]

    random_start = losses(trained_gpt)[1]
    gain = random_start - trained_eval
    assert gain > 0.3
    for name, source in (("ckpt", str(trained_gpt)), ("hf", f"hf:{tmp_path / 'hf'}")):
        run = tmp_path / name
        # A different seed: any head start must come from the loaded weights.
        train(run, prepared_dir, "trainer.max_steps=3", "schedule.warmup_steps=1",
              f"model.init_from={source}",
              "trainer.seed=99", *STEPS)
        first = losses(run)[1]
        assert abs(first - trained_eval) < 0.3 * gain, (name, first, trained_eval, random_start)


def test_init_from_another_family_is_refused(tmp_path: Path, prepared_dir: Path,
                                             trained_gpt: Path) -> None:
    result = train(tmp_path / "llama", prepared_dir, "model=llama-tiny",
                   f"model.init_from={trained_gpt}", "trainer.max_steps=1",
                   "schedule.warmup_steps=0", check=False)
    assert result.returncode == 2
    assert "is a gpt model, but model.family=llama" in result.stderr
