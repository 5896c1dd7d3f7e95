"""The README's quickstart, end to end: prepare the embedded corpus, train, evaluate, sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.helpers import env_for_tests, metrics, run_module

pytestmark = pytest.mark.integration


def test_quickstart_learns_far_below_the_unigram_entropy(tmp_path: Path) -> None:
    run_dir = tmp_path / "quickstart"
    env = env_for_tests(tmp_cache=tmp_path / "cache")
    env.pop("OMP_NUM_THREADS")  # as a user runs it: all cores
    result = run_module("train", ["experiment=quickstart", f"run.dir={run_dir}",
                                  "logger.wandb.mode=offline", "logger.progress=false"],
                        env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-5000:]

    manifest = json.loads((tmp_path / "cache" / "stdlib-v4096" / "manifest.json").read_text())
    entropy = manifest["stats"]["unigram_entropy"]
    final_eval = [row["eval_loss"] for row in metrics(run_dir) if "eval_loss" in row][-1]
    # "Far below": at least one nat, i.e. a perplexity under e^-1 of the unigram model's.
    assert final_eval < entropy - 1.0, (final_eval, entropy)

    assert "----- sample" in result.stdout
    sample = result.stdout.split("-----\n", 1)[1]
    assert len(sample.strip()) > 100
    assert (run_dir / "checkpoints" / "latest").exists()
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run missing"
