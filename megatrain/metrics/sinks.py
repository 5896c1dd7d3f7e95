"""Console, JSONL and W&B sinks behind one ``MetricSinks.log(row)`` call."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Protocol

from megatrain.config.schema import Config
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


class JsonlSink:
    """``metrics.jsonl``: one JSON object per row, flushed at once so a crash loses nothing."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        truncate_after(path, resume_step)
        self.file = path.open("a", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def truncate_after(path: Path, step: int) -> None:
    """Drop rows past ``step``: a resumed run repeats those steps, so they must not appear twice."""
    if not path.exists():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")


class MetricSinks:
    """Fans one row out to every sink."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, row: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    @property
    def wandb_run_id(self) -> str | None:
        return next((s.run_id for s in self.sinks if isinstance(s, WandbSink)), None)


def build_sinks(cfg: Config, run_dir: Path, start_step: int, wandb_run_id: str | None,
                config_dict: dict[str, Any]) -> MetricSinks:
    """The sinks rank 0 writes to; ``wandb_run_id`` continues the run a checkpoint names."""
    sinks: list[Sink] = [
        ConsoleSink(cfg.trainer.max_steps, start_step, cfg.logger.progress),
        JsonlSink(run_dir / "metrics.jsonl", start_step),
    ]
    wandb = WandbSink.create(cfg.logger.wandb, run_dir, cfg.run.name, wandb_run_id, config_dict)
    if wandb is not None:
        sinks.append(wandb)
    return MetricSinks(sinks)
