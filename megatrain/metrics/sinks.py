"""Console, JSONL and W&B sinks behind one ``MetricSinks.log(row)`` call."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from megatrain.config.schema import Config
from megatrain.metrics.jsonl import ABANDONED_FILE, METRICS_FILE, read_rows, read_rows_and_tail
from megatrain.metrics.wandb_sink import WandbSink

log = logging.getLogger("megatrain")


def setup_console_logging(rank: int) -> None:
    """Log lines on rank 0 only (others warn and worse), one format, to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Sink(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key} {value:.4g}" if abs(value) < 1e4 else f"{key} {value:,.0f}"
    return f"{key} {value}"


class ConsoleSink:
    """A tqdm bar on an interactive terminal, a log line per row everywhere."""

    def __init__(self, max_steps: int, start_step: int, progress: bool) -> None:
        self.bar = None
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, row: dict[str, Any]) -> None:
        shown = {k: v for k, v in row.items() if k != "step" and v is not None}
        if self.bar is not None and "loss" in row:
            self.bar.update(row["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
        if self.bar is not None:
            self.bar.write(f"step {row['step']} | " + " | ".join(_fmt(k, v) for k, v in shown.items()))
        else:
            log.info("step %d | %s", row["step"], " | ".join(_fmt(k, v) for k, v in shown.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class ResumePoint:
    """Where a checkpoint left the metrics: its step, the rows ``metrics.jsonl`` had when it was
    saved (None: a checkpoint from before this was recorded) and its W&B run; ``elsewhere``: it
    belongs to another run folder, which holds its rows and its W&B run's logs."""

    step: int
    rows: int | None = None
    wandb_run_id: str | None = None
    elsewhere: bool = False

    @classmethod
    def from_state(cls, state: dict[str, Any], elsewhere: bool = False) -> ResumePoint:
        """From a checkpoint's rank state (``progress``, ``metrics_rows``, ``wandb_run_id``)."""
        return cls(state["progress"]["step"], state.get("metrics_rows"),
                   state.get("wandb_run_id"), elsewhere)


class JsonlSink:
    """``metrics.jsonl``: one JSON object per row, flushed at once so a crash loses nothing.

    It holds the surviving timeline only: when a run goes back to a checkpoint (a resume, a
    rollback), the rows logged after that checkpoint move to ``metrics.abandoned.jsonl``, each
    tagged with its ``timeline`` (1 for the first timeline abandoned, ...), the step the run went
    back to (``rewound_to``) and why (``reason``)."""

    def __init__(self, path: Path, resume: ResumePoint | None) -> None:
        self.path = path
        self.abandoned = path.with_name(ABANDONED_FILE)
        self.rows = len(self._go_back(resume or ResumePoint(0, 0),
                                      "resume" if resume else "restart"))
        self.file = path.open("a", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.rows += 1

    def commit(self) -> None:
        """To disk before anything else learns of these rows (a checkpoint, W&B)."""
        os.fsync(self.file.fileno())

    def go_back(self, point: ResumePoint, reason: str) -> list[dict[str, Any]]:
        """Back to the checkpoint ``point`` describes; the rows that survive, in order."""
        self.file.close()
        kept = self._go_back(point, reason)
        self.rows = len(kept)
        self.file = self.path.open("a", encoding="utf-8")
        return kept

    def surviving(self) -> list[dict[str, Any]]:
        """The rows of the timeline that survived so far, in order."""
        return read_rows(self.path)

    def _go_back(self, point: ResumePoint, reason: str) -> list[dict[str, Any]]:
        """Keep the rows the checkpoint had (the first ``point.rows``; by step for an older
        checkpoint), move the rest aside, drop a torn last line (a crash mid-write); the rows
        kept."""
        rows, torn = read_rows_and_tail(self.path)
        if torn:
            log.warning("metrics: %s ends in a torn line (a crash mid-write): dropped",
                        self.path)
        if point.rows is not None:
            keep = min(point.rows, len(rows))
        else:
            keep = next((i for i, row in enumerate(rows) if row["step"] > point.step), len(rows))
        if keep < len(rows):
            self._abandon(rows[keep:], point.step, reason)
        if keep < len(rows) or torn:
            _write_atomic(self.path, rows[:keep])
        return rows[:keep]

    def _abandon(self, rows: list[dict[str, Any]], step: int, reason: str) -> None:
        timeline = 1 + max((r.get("timeline", 0) for r in read_rows(self.abandoned)), default=0)
        with self.abandoned.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({**row, "timeline": timeline, "rewound_to": step,
                                    "reason": reason}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("metrics: %d rows logged after step %d moved to %s (timeline %d, %s)",
                 len(rows), step, self.abandoned.name, timeline, reason)

    def close(self) -> None:
        self.file.close()


def _write_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def truncate_after(path: Path, step: int) -> None:
    """Drop rows past ``step``: a resumed run repeats those steps, so they must not appear twice."""
    if not path.exists():
        return
    rows = [row for row in read_rows(path) if row["step"] <= step]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


class MetricSinks:
    """Fans one row out to every sink, and keeps them on one timeline: ``commit`` once a
    checkpoint (or the run's end) makes the rows so far durable, ``go_back`` when the run
    returns to a checkpoint, ``state`` for the checkpoint to carry."""

    def __init__(self, console: ConsoleSink, jsonl: JsonlSink, wandb: WandbSink | None) -> None:
        self.jsonl, self.wandb = jsonl, wandb
        self.sinks: list[Sink] = [s for s in (console, jsonl, wandb) if s is not None]

    def log(self, row: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(row)

    def commit(self) -> None:
        if self.wandb is not None:
            self.wandb.commit()

    def go_back(self, point: ResumePoint, reason: str) -> None:
        """The run went back to the checkpoint ``point`` describes (``reason``: rollback)."""
        surviving = self.jsonl.go_back(point, reason)
        if self.wandb is not None:
            self.wandb.go_back(point.step, surviving)

    def state(self) -> dict[str, Any]:
        """What a checkpoint records of the metrics (``ResumePoint.from_state`` reads it); the
        rows it counts are on disk first."""
        self.jsonl.commit()
        return {"metrics_rows": self.jsonl.rows, "wandb_run_id": self.wandb_run_id}

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb.run_id if self.wandb is not None else None


def build_sinks(cfg: Config, run_dir: Path, resume: ResumePoint | None,
                config_dict: dict[str, Any]) -> MetricSinks:
    """The sinks rank 0 writes to, on the timeline of the checkpoint ``resume`` describes (None:
    a run from scratch; rows already in the run folder are moved aside). From another folder's
    checkpoint this folder's history starts after its step, in a W&B run forked from its run."""
    here = replace(resume, rows=0) if resume and resume.elsewhere else resume
    jsonl = JsonlSink(run_dir / METRICS_FILE, here)
    start = resume.step if resume else 0
    wandb = WandbSink.create(cfg.logger.wandb, run_dir, cfg.run.name, config_dict,
                             resume.wandb_run_id if resume else None, start, jsonl.surviving(),
                             fork=bool(resume and resume.elsewhere))
    return MetricSinks(ConsoleSink(cfg.trainer.max_steps, start, cfg.logger.progress),
                       jsonl, wandb)
