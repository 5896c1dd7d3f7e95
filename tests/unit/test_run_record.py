"""Hydra's run record and folder rules (megatrain/jobs/run_record.py), the Optuna sweeper's search
spaces (megatrain/jobs/optuna_sweeper.py) and how a sweep ranks its jobs
(megatrain/jobs/sweep.py): pure functions, no training."""

from __future__ import annotations

import json
from pathlib import Path

import optuna.distributions as d
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from megatrain.errors import ConfigError
from megatrain.jobs.optuna_sweeper import OptunaSweeper, search_space
from megatrain.jobs.run_record import align_run_dirs, expand_rerun, record_folder
from megatrain.jobs.sweep import job_metric, objective, summarize


def test_one_folder_setting_wins() -> None:
    assert align_run_dirs(["hydra.run.dir=a", "x=1"]) == ["x=1", "run.dir=a"]
    assert align_run_dirs(["run.dir=a", "hydra.run.dir=a"]) == ["run.dir=a"]
    assert align_run_dirs(["-m", "run.dir=s", "x=1,2"]) == ["-m", "x=1,2", "hydra.sweep.dir=s"]
    assert align_run_dirs(["-m", "hydra.sweep.dir=s"]) == ["-m", "hydra.sweep.dir=s"]
    assert align_run_dirs(["run.dir=a"]) == ["run.dir=a"]
    with pytest.raises(ConfigError, match="run.dir wins"):
        align_run_dirs(["run.dir=a", "hydra.run.dir=b"])
    with pytest.raises(ConfigError, match="hydra.sweep.dir wins"):
        align_run_dirs(["--multirun", "run.dir=a", "hydra.sweep.dir=b"])
    with pytest.raises(ConfigError, match="set hydra.sweep.dir instead"):
        align_run_dirs(["-m", "run.dir=a,b"])


def _record(folder: Path, overrides: list[str]) -> None:
    folder.mkdir(parents=True)
    (folder / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def test_a_resumed_run_keeps_its_first_record(tmp_path: Path) -> None:
    assert record_folder(tmp_path) == tmp_path / ".hydra"
    _record(tmp_path / ".hydra", ["optim.lr=0.1", "run.dir=x"])
    assert record_folder(tmp_path) == tmp_path / ".hydra" / "resume_1"
    _record(tmp_path / ".hydra" / "resume_1", [])
    assert record_folder(tmp_path) == tmp_path / ".hydra" / "resume_2"


def test_rerun_takes_the_recorded_overrides_less_the_folder(tmp_path: Path) -> None:
    _record(tmp_path / ".hydra", ["optim.lr=0.1", "run.dir=x", "run.name=n"])
    args, source = expand_rerun(["--rerun", str(tmp_path), "run.dir=new", "run.name=m"])
    assert args == ["optim.lr=0.1", "run.name=n", "run.dir=new", "run.name=m"]
    assert source == tmp_path.resolve()
    assert expand_rerun(["a=1"]) == (["a=1"], None)
    with pytest.raises(ConfigError, match="overrides.yaml: no such file"):
        expand_rerun(["--rerun", str(tmp_path / "nothing")])


def test_search_spaces() -> None:
    parser = OverridesParser.create()
    space, fixed = search_space(parser.parse_overrides([
        "optim.lr=tag(log, interval(1e-4, 1e-2))", "trainer.seed=interval(1, 5)",
        "trainer.micro_batch_size=range(2, 10, 4)", "model=choice(gpt2-tiny, llama-tiny)",
        "optim.weight_decay=0.0,0.1", "trainer.max_steps=10"]))
    assert space == {
        "optim.lr": d.FloatDistribution(1e-4, 1e-2, log=True),
        "trainer.seed": d.FloatDistribution(1, 5),  # Hydra's intervals are float: range() for ints
        "trainer.micro_batch_size": d.IntDistribution(2, 6, step=4),
        "model": d.CategoricalDistribution(["gpt2-tiny", "llama-tiny"]),
        "optim.weight_decay": d.CategoricalDistribution([0.0, 0.1]),
    }
    assert fixed == ["trainer.max_steps=10"]


def test_job_metric() -> None:
    assert job_metric({"eval_loss": 2.5, "eval_acc": 0.5}, "eval_acc") == 0.5
    assert job_metric({"eval_loss": float("nan")}) is None and job_metric(None) is None


@pytest.mark.parametrize("metric, direction, want", [
    ("eval_loss", None, "minimize"), ("eval_ppl", None, "minimize"),
    ("eval_accuracy", None, "maximize"), ("eval_rouge1", None, "maximize"),
    ("eval_accuracy", "minimize", "minimize"), ("eval_loss", "maximize", "maximize")])
def test_a_sweep_direction_is_the_metrics_own_unless_given(metric: str, direction: str | None,
                                                            want: str) -> None:
    """Both the Optuna study and the sweep summary: accuracies and scores are maximised, losses
    and perplexities minimised (training.best.minimised), an explicit direction wins."""
    sweeper = OptunaSweeper(metric, direction, n_trials=1, n_jobs=1, study_name="s",
                            storage="memory", sampler=None, params=None)
    assert sweeper.direction == want
    config = OmegaConf.create({"hydra": {"sweeper": {"metric": metric, "direction": direction}}})
    assert objective(config) == (metric, want)
    assert objective(OmegaConf.create({"hydra": {}})) == ("eval_loss", "minimize")
    with pytest.raises(ValueError, match="minimize or maximize"):
        OptunaSweeper(metric, "max", 1, 1, "s", "memory", None, None)


def test_the_best_job_follows_the_direction(tmp_path: Path) -> None:
    for job, value, status in ((0, 0.2, "completed"), (1, 0.9, "completed"),
                               (2, None, "failed")):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "sweep_result.json").write_text(json.dumps(
            {"job": job, "overrides": ["a=1", f"lr={job}"], "status": status,
             "metric": "eval_acc", "value": value, "eval_loss": None}))
    assert summarize(tmp_path)["best"]["job"] == 0
    best = summarize(tmp_path, "maximize")["best"]
    assert best["job"] == 1 and best["swept"] == ["lr=1"]
