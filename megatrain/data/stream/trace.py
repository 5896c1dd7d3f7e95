"""``data.trace``: which documents each step consumed, per rank.

Each rank appends ``{"step": N, "keys": [...], "epochs": [...]}`` to
``<run.dir>/data_trace/rank<R>.jsonl``: the keys of the documents whose last token (EOS) the step
consumed, and the epoch each was read in. A document split over two steps is listed once, at the
step that finished it, so over all ranks every key appears exactly once per epoch — the audit of
exactly-once reading. In a mixture keys read ``<source>/<key>``. On a resume, lines past the
resumed step (written after the checkpoint by the interrupted run) are dropped first.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatrain.metrics.sinks import truncate_after

TRACE_DIR = "data_trace"


def trace_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / TRACE_DIR / f"rank{rank}.jsonl"


class TraceWriter:
    """Appends one line per step; line-buffered, so a killed run keeps what it wrote."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, resume_step: int) -> None:
        folder = Path(run_dir) / TRACE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        own = trace_path(run_dir, rank)
        truncate_after(own, resume_step)
        if rank == 0:  # and the files of old ranks that this (smaller) world no longer has
            for path in folder.glob("rank*.jsonl"):
                if int(path.stem[4:]) >= world_size:
                    truncate_after(path, resume_step)
        self._file = own.open("a", encoding="utf-8", buffering=1)

    def write(self, step: int, keys: list[str], epochs: list[int]) -> None:
        self._file.write(json.dumps({"step": step, "keys": keys, "epochs": epochs}) + "\n")

    def close(self) -> None:
        self._file.close()


def read_traces(run_dir: Path) -> dict[int, list[dict]]:
    """Every rank's trace lines, by rank."""
    out = {}
    for path in sorted((Path(run_dir) / TRACE_DIR).glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        out[rank] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out
