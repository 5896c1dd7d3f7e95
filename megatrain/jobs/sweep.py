"""Hydra sweeps (``megatrain-train -m ...``): one run folder per job, a W&B group, a summary.

Every job of a multirun gets its Hydra job folder (``hydra.sweep.dir``/``hydra.sweep.subdir``)
as ``run.dir`` (``run.dir=X`` given with ``-m`` sets ``hydra.sweep.dir``: megatrain/jobs/
run_record.py) — without it all jobs would share ``outputs/<run.name>`` and the second job would
"resume" the first —, the name
``<run.name>-<job number>`` (its W&B run name) and, unless ``logger.wandb.group`` is set, the W&B
group ``<run.name>``. Rerunning the same sweep resumes each job from its folder.

``SweepSummary`` (a Hydra callback, listed in ``configs/config.yaml``) writes each job's outcome
to ``<job dir>/sweep_result.json`` when the job ends — wherever it runs, so also inside a SLURM
job — and, when the multirun ends, ``<sweep dir>/sweep_summary.json``: the final eval loss of every
job and the best job's overrides, also logged to W&B (offline without an API key). The score is
the job's final ``metric`` (``hydra.sweeper.metric`` under ``hydra/sweeper=optuna``, else
``eval_loss``), best by ``hydra.sweeper.direction`` (else the metric's own: losses minimised,
accuracies and scores maximised). After a sweep that
stopped early (a failed job makes Hydra stop before ``on_multirun_end``), write the summary of
what finished with ``python -m megatrain.jobs.sweep SWEEP_DIR``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from megatrain.training.best import minimised

log = logging.getLogger("megatrain")
RESULT_FILE = "sweep_result.json"
SUMMARY_FILE = "sweep_summary.json"


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def override_key(arg: str) -> str:
    """The config key a Hydra override sets (``+a.b=1``, ``~a.b`` and ``a.b=1`` → ``a.b``)."""
    return arg.split("=", 1)[0].lstrip("+~")


def overridden_keys(overrides: list[str]) -> set[str]:
    """The config keys a list of Hydra overrides sets."""
    return {override_key(o) for o in overrides}


def prepare_sweep_job(cfg: DictConfig) -> None:
    """In a multirun job: its own run folder and W&B name, a W&B group shared by the sweep."""
    if not in_multirun():
        return
    hydra = HydraConfig.get()
    name = cfg.run.name
    cfg.run.dir = hydra.runtime.output_dir  # first: run.dir's default interpolates run.name
    cfg.run.name = f"{name}-{hydra.job.num}"
    if cfg.logger.wandb.group is None:
        cfg.logger.wandb.group = name


def direction_of(metric: str, direction: str | None = None) -> str:
    """``direction`` when given, else the metric's own (``minimised``: losses and perplexities
    minimize, accuracies and scores maximize)."""
    if direction is not None:
        return direction
    return "minimize" if minimised(metric) else "maximize"


def objective(config: DictConfig) -> tuple[str, str]:
    """The metric a sweep ranks jobs by and its direction (the Optuna sweeper's, or eval_loss;
    the direction the sweeper's, else the metric's own)."""
    metric = str(OmegaConf.select(config, "hydra.sweeper.metric", default=None) or "eval_loss")
    direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    return metric, direction_of(metric, None if direction is None else str(direction))


def job_metric(value: dict[str, Any] | None, metric: str = "eval_loss") -> float | None:
    """A job's final ``metric`` from what its task function returned (its final eval metrics,
    or None), or None when it has none or it is not finite."""
    value = value.get(metric) if isinstance(value, dict) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def job_result(config: DictConfig, job_return: JobReturn) -> dict[str, Any]:
    """One job's line in the summary: its overrides, whether it finished, its final metrics."""
    completed = job_return.status == JobStatus.COMPLETED
    value, error = job_return.return_value if completed else None, None
    if not completed:  # return_value would re-raise; the field holds the job's exception
        err = job_return._return_value
        error = f"{type(err).__name__}: {err}"
    metric, _ = objective(config)
    return {"job": int(config.hydra.job.num),
            "overrides": list(config.hydra.overrides.task),
            "status": "completed" if completed else "failed", "metric": metric, "value": job_metric(value, metric),
            "eval_loss": job_metric(value), "error": error,
            "job_dir": str(config.hydra.runtime.output_dir),
            "config": str(Path(config.hydra.runtime.output_dir) / "config.yaml")}


def summarize(sweep_dir: Path, direction: str = "minimize") -> dict[str, Any]:
    """Collect every job's result under ``sweep_dir``; the best has the lowest (``direction``
    maximize: highest) final metric.

    Each job also gets ``swept``: its overrides that not every job shares (what the sweep varied).
    """
    jobs = sorted((json.loads(p.read_text(encoding="utf-8"))
                   for p in sweep_dir.glob(f"*/{RESULT_FILE}")), key=lambda job: job["job"])
    shared = set.intersection(*(set(job["overrides"]) for job in jobs)) if jobs else set()
    for job in jobs:
        job["swept"] = [o for o in job["overrides"] if o not in shared]
    for job in jobs:  # results written before "metric"/"value" existed
        job.setdefault("metric", "eval_loss")
        job.setdefault("value", job["eval_loss"])
    scored = [job for job in jobs if job["value"] is not None and job["status"] == "completed"]
    pick = max if direction == "maximize" else min
    best = pick(scored, key=lambda job: job["value"]) if scored else None
    return {"sweep_dir": str(sweep_dir), "direction": direction, "jobs": jobs, "best": best}


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal: every job, best first, then the best config."""
    lines = [f"sweep {summary['sweep_dir']}: {len(summary['jobs'])} jobs"]
    sign = -1.0 if summary.get("direction") == "maximize" else 1.0
    for job in sorted(summary["jobs"], key=lambda job: _rank(job, sign)):
        score = f"{job['value']:.4f}" if job["value"] is not None else ""
        state = "" if job["status"] == "completed" else f" ({job['status']})"
        lines.append(f"  job {job['job']}  {job['metric']} {score}{state}  "
                     f"{' '.join(job['swept'])}")
    best = summary["best"]
    if best:
        lines.append(f"best: job {best['job']} ({' '.join(best['swept'])}), "
                     f"config {best['config']}")
    return "\n".join(lines)


def _rank(job: dict[str, Any], sign: float) -> tuple[bool, float]:
    return job["value"] is None or job["status"] != "completed", sign * (job["value"] or 0.0)


def write_summary(sweep_dir: Path, direction: str = "minimize") -> dict[str, Any]:
    """Write ``sweep_summary.json`` and print the table of jobs."""
    summary = summarize(sweep_dir, direction)
    (sweep_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"{format_summary(summary)}\nsummary: {sweep_dir / SUMMARY_FILE}", flush=True)
    return summary


def log_summary_to_wandb(summary: dict[str, Any], cfg: DictConfig) -> None:
    """One more run in the sweep's W&B group: the table of jobs and the best config."""
    from megatrain.metrics.wandb_sink import resolve_mode

    mode = resolve_mode(cfg.logger.wandb.mode)
    if mode == "disabled":
        return
    import wandb

    group = cfg.logger.wandb.group or cfg.run.name
    run = wandb.init(project=cfg.logger.wandb.project, entity=cfg.logger.wandb.entity,
                     group=group, name=f"{group}-summary", job_type="sweep-summary", mode=mode,
                     dir=summary["sweep_dir"], config={"sweep_dir": summary["sweep_dir"]})
    rows = [[job["job"], " ".join(job["swept"]), job["status"], job["eval_loss"], job["value"]]
            for job in summary["jobs"]]
    run.log({"sweep": wandb.Table(columns=["job", "overrides", "status", "eval_loss", "value"],
                                  data=rows)})
    if summary["best"]:
        run.summary["best_eval_loss"] = summary["best"]["eval_loss"]
        run.summary["best_metric"] = summary["best"]["metric"]
        run.summary["best_value"] = summary["best"]["value"]
        run.summary["best_overrides"] = " ".join(summary["best"]["swept"])
        run.summary["best_config"] = summary["best"]["config"]
        run.summary["best_job"] = summary["best"]["job"]
    run.finish()


class SweepSummary(Callback):
    """Records each sweep job's outcome as it ends; summarises the sweep when it ends."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        out = Path(config.hydra.runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULT_FILE).write_text(json.dumps(job_result(config, job_return)) + "\n",
                                       encoding="utf-8")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = write_summary(Path(config.hydra.sweep.dir), objective(config)[1])
        log_summary_to_wandb(summary, config)


def main(argv: list[str] | None = None) -> None:
    """``python -m megatrain.jobs.sweep SWEEP_DIR``: (re)write the summary of a sweep."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        sys.exit("usage: python -m megatrain.jobs.sweep SWEEP_DIR")
    sweep_config = Path(args[0]) / "multirun.yaml"  # Hydra's sweepers write it
    direction = objective(OmegaConf.load(sweep_config))[1] if sweep_config.is_file() else "minimize"
    write_summary(Path(args[0]), direction)


if __name__ == "__main__":
    main()
