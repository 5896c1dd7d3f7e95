"""Loss, eval loss, LR and tokens/s curves of run folders, read from their ``metrics.jsonl``.

The data side (``find_runs``, ``series``) is plain Python so it can be tested without pixels;
``draw`` is the only part that needs matplotlib (the ``megatrain[plot]`` extra, Agg backend).
Only ``metrics.jsonl`` is read (``jsonl.read_rows``) — rows an abandoned timeline left in
``metrics.abandoned.jsonl`` are not part of the run's history — and where a file still holds a
step twice (a rollback or crash-resume written before rows were moved aside), the last row for
the step wins, metric by metric: a step's train row and eval row are separate rows and both
count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatrain.errors import ConfigError, DataError
from megatrain.metrics.jsonl import METRICS_FILE, read_rows

DEFAULT_METRICS = ("loss", "eval_loss", "lr", "tokens_per_s")
# The x axes a row can be drawn against: the option's name -> the column that holds it.
X_AXES = {"step": "step", "tokens": "tokens_seen"}
FORMATS = (".png", ".svg", ".pdf")


@dataclass
class RunMetrics:
    """One run: its legend name, its folder and its metric rows in file order."""

    name: str
    folder: Path
    rows: list[dict[str, Any]]

    def has(self, metric: str) -> bool:
        return any(_number(row.get(metric)) is not None for row in self.rows)


def run_folders(path: Path) -> list[Path]:
    """``path`` if it holds a ``metrics.jsonl``, else its subfolders that do (a sweep folder:
    one job per subfolder, in job-number order)."""
    if not path.is_dir():
        raise ConfigError(f"{path}: no such run folder")
    if (path / METRICS_FILE).is_file():
        return [path]
    jobs = [p.parent for p in path.glob(f"*/{METRICS_FILE}")]
    if not jobs:
        raise DataError(f"{path}: no {METRICS_FILE} in it or in its subfolders (not a run or "
                        "sweep folder, or the run has not logged a step yet)")
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit()
                                       else 0, p.name))


def run_name(folder: Path) -> str:
    """``run.name`` from the run's ``config.yaml`` (as ``megatrain-train`` wrote it), else the
    folder's name."""
    config = folder / "config.yaml"
    if config.is_file():
        import yaml

        try:
            record = yaml.safe_load(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):  # not ours: the folder names it
            record = None
        run = record.get("run") if isinstance(record, dict) else None
        name = run.get("name") if isinstance(run, dict) else None
        if isinstance(name, str) and name:
            return name
    return folder.name


def find_runs(paths: list[Path]) -> list[RunMetrics]:
    """Every run under ``paths`` (run folders or sweep folders), named for the legend; when two
    runs share a ``run.name`` their folder paths name them instead."""
    folders = [folder for path in paths for folder in run_folders(Path(path))]
    names = [run_name(f) for f in folders]
    if len(set(names)) < len(names):
        names = [str(f) for f in folders]
    return [RunMetrics(name, folder, read_rows(folder / METRICS_FILE))
            for name, folder in zip(names, folders, strict=True)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def last_per_step(rows: list[dict[str, Any]], metric: str) -> dict[int, float]:
    """``metric`` at each step, the last row that carries it winning."""
    values: dict[int, float] = {}
    for row in rows:
        value = _number(row.get(metric))
        if value is not None:
            values[row["step"]] = value
    return dict(sorted(values.items()))


def series(run: RunMetrics, metric: str, x: str = "step") -> tuple[list[float], list[float]]:
    """``(xs, ys)`` of ``metric`` in step order, one point per step.

    Against tokens, a row without ``tokens_seen`` (an eval row) takes the count the train rows
    give at its step, interpolated linearly between logged steps (from 0 tokens at step 0)."""
    if x not in X_AXES:
        raise ConfigError(f"--x {x!r}: one of {', '.join(X_AXES)}")
    values = last_per_step(run.rows, metric)
    if x == "step":
        return [float(s) for s in values], list(values.values())
    tokens = {0: 0.0, **last_per_step(run.rows, X_AXES[x])}
    if len(tokens) == 1:
        raise DataError(f"{run.folder / METRICS_FILE}: no row has {X_AXES[x]!r} to plot against")
    import numpy as np

    xs = np.interp(list(values), list(tokens), list(tokens.values()))
    return xs.tolist(), list(values.values())


def draw(runs: list[RunMetrics], metrics: list[str], x: str, out: Path) -> list[str]:
    """One panel per metric that some run logs, one line per run, saved to ``out`` (its suffix
    picks PNG / SVG / PDF). Returns the metrics drawn."""
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"--out {out}: the file name ends in one of {', '.join(FORMATS)}")
    drawn = [m for m in metrics if any(run.has(m) for run in runs)]
    if not drawn:
        keys = sorted({k for run in runs for row in run.rows for k in row})
        raise DataError(f"no run logs any of {', '.join(metrics)} (their rows hold: "
                        f"{', '.join(keys) or 'nothing'})")
    plt = _pyplot()
    from matplotlib.ticker import EngFormatter

    cols = min(2, len(drawn))
    rows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False,
                             sharex=True)  # eval points line up with the train curves
    for ax, metric in zip(axes.flat, drawn, strict=False):
        for run in runs:
            if run.has(metric):
                xs, ys = series(run, metric, x)
                ax.plot(xs, ys, label=run.name, marker="o" if len(xs) < 12 else None, ms=3)
        ax.set_title(metric)
        ax.set_xlabel(x)
        ax.tick_params(labelbottom=True)  # sharex hides them but on the bottom row
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(EngFormatter())
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    legend = {}  # one entry per run, whichever panel drew it
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.legend(legend.values(), legend.keys(), loc="upper center", ncol=min(len(legend), 4),
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.6 * rows)))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return drawn


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("megatrain-plot needs matplotlib: pip install 'megatrain[plot]'") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
