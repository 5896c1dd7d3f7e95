"""Hydra's own record in every run folder (``.hydra/``, ``train.log``) reproduces the run, a resumed
run keeps its first record, and a 3-trial Optuna search sweep (``hydra/sweeper=optuna``, basic
launcher: each trial its own torchrun) names its best trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.integration.helpers import TINY, losses, metrics, run_module

pytestmark = pytest.mark.integration
SHORT = ["trainer.max_steps=6", "schedule.warmup_steps=2", "trainer.log_every=1",
         "trainer.eval_every=6", "trainer.eval_steps=2", "trainer.save_every=1000"]


def _run(*args: str) -> str:
    result = run_module("train", list(args), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def test_the_record_reproduces_the_run(tmp_path: Path, prepared) -> None:
    first, again = tmp_path / "first", tmp_path / "again"
    _run(*TINY, f"data.train={prepared.root}", *SHORT, "optim.lr=3e-3", f"run.dir={first}")
    record = first / ".hydra"
    assert sorted(p.name for p in record.iterdir()) == ["config.yaml", "hydra.yaml",
                                                        "overrides.yaml"]
    overrides = yaml.safe_load((record / "overrides.yaml").read_text())
    assert "optim.lr=3e-3" in overrides and f"run.dir={first}" in overrides
    assert yaml.safe_load((record / "config.yaml").read_text())["optim"]["lr"] == 3e-3
    assert yaml.safe_load((record / "hydra.yaml").read_text())["hydra"]["run"]["dir"] == \
        "${run.dir}"
    log = (first / "train.log").read_text()
    assert log.startswith("---- start ") and "step 6 | loss" in log and "done: step 6" in log

    _run("--rerun", str(first), f"run.dir={again}")
    assert losses(again) == losses(first) and len(losses(first)) == 6
    assert [r["eval_loss"] for r in metrics(again) if "eval_loss" in r] == \
        [r["eval_loss"] for r in metrics(first) if "eval_loss" in r]

    # The same command again resumes (at the end): the first record stays, the restart's is kept
    # beside it; a rerun into its own folder is refused.
    _run(*overrides)
    assert yaml.safe_load((record / "overrides.yaml").read_text()) == overrides
    assert yaml.safe_load((record / "resume_1" / "overrides.yaml").read_text()) == overrides
    assert (first / "train.log").read_text().count("---- start ") == 2
    refused = run_module("train", ["--rerun", str(first), f"run.dir={first}"], timeout=120)
    assert refused.returncode == 2 and "another folder" in refused.stderr


def test_hydra_run_dir_is_run_dir(tmp_path: Path, prepared) -> None:
    """``hydra.run.dir=X`` trains in X (no empty folder elsewhere)."""
    run_dir = tmp_path / "via_hydra"
    _run(*TINY, f"data.train={prepared.root}", *SHORT, "trainer.max_steps=3",
         "trainer.eval_every=3", f"hydra.run.dir={run_dir}")
    assert (run_dir / ".hydra" / "overrides.yaml").is_file() and losses(run_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["via_hydra"]


def test_optuna_sweep_of_the_learning_rate(tmp_path: Path, prepared) -> None:
    sweep_dir = tmp_path / "sweep"
    out = _run("-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", *TINY,
               f"data.train={prepared.root}", *SHORT, "run.name=lrsearch",
               "optim.lr=tag(log, interval(1e-4, 3e-2))", f"run.dir={sweep_dir}")
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    jobs = summary["jobs"]
    assert [job["job"] for job in jobs] == [0, 1, 2]
    for job in jobs:
        job_dir = sweep_dir / str(job["job"])
        final = [r["eval_loss"] for r in metrics(job_dir) if "eval_loss" in r][-1]
        assert job["status"] == "completed" and job["value"] == pytest.approx(final)
        (swept,) = job["swept"]
        assert swept.startswith("optim.lr=") and 1e-4 <= float(swept.split("=")[1]) <= 3e-2
        assert swept in yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    assert len({job["value"] for job in jobs}) == 3
    best = min(jobs, key=lambda job: job["value"])
    assert summary["best"]["job"] == best["job"]
    assert summary["best"]["overrides"] == best["overrides"]
    assert f"best: job {best['job']} ({best['swept'][0]})" in out
    assert f"optuna: best trial {best['job']}, eval_loss {best['value']:.4f}" in out
    assert (sweep_dir / "optuna.journal").is_file()
