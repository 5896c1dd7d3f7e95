"""The best checkpoint by an eval metric (``trainer.keep_best``), kept beside ``keep_last``.

After an eval that improves the metric the trainer saves (if that step is not a save step
anyway) and records the checkpoint in ``checkpoints/best.json``; retention never deletes the
checkpoint it names, and a resumed run reads it back, so "best" spans restarts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatrain.errors import ConfigError

BEST = "best.json"


def minimised(metric: str) -> bool:
    """Losses and perplexities improve downwards; accuracies and scores upwards."""
    return "loss" in metric or "ppl" in metric


def best_tag(root: Path) -> str | None:
    """The checkpoint ``best.json`` in ``root`` names, if any."""
    try:
        return json.loads((root / BEST).read_text(encoding="utf-8"))["checkpoint"]
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class BestTracker:
    """The best value of ``metric`` so far and the checkpoint that holds it."""

    root: Path  # the run's checkpoints folder
    metric: str
    value: float | None = None
    step: int | None = None

    @classmethod
    def load(cls, root: Path, metric: str, known: list[str]) -> BestTracker:
        """The tracker of a run; ConfigError when ``metric`` is not one of the run's ``known``
        eval metrics. A record of another metric (the key changed between runs) starts afresh."""
        if metric not in known:
            raise ConfigError(f"trainer.keep_best={metric}: not an eval metric of this run; it "
                              f"reports {', '.join(known)}")
        tracker = cls(root, metric)
        try:
            saved = json.loads((root / BEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return tracker
        if saved.get("metric") == metric:
            tracker.value, tracker.step = float(saved["value"]), int(saved["step"])
        return tracker

    def improves(self, row: dict[str, float]) -> bool:
        value = row.get(self.metric)
        if value is None:
            return False
        if self.value is None:
            return True
        return value < self.value if minimised(self.metric) else value > self.value

    def mark(self, row: dict[str, float], step: int, write: bool) -> None:
        """Record ``step``'s checkpoint as the best (``write``: on the main rank, atomically)."""
        self.value, self.step = float(row[self.metric]), step
        if write:
            record = {"metric": self.metric, "value": self.value, "step": step,
                      "checkpoint": f"step_{step}"}
            tmp = self.root / f".{BEST}.tmp"
            tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
            tmp.replace(self.root / BEST)

    @property
    def checkpoint(self) -> Path | None:
        return None if self.step is None else self.root / f"step_{self.step}"
