"""The metric files of a run folder and their one reader: one JSON object per line, each with an
integer ``step``, written a line at a time (so a crash can leave the last line torn)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatrain.errors import DataError

METRICS_FILE = "metrics.jsonl"  # the surviving timeline
ABANDONED_FILE = "metrics.abandoned.jsonl"  # rows of timelines a resume or rollback abandoned


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file (none when there is no file); a torn last line (a crash
    mid-write) is skipped."""
    return read_rows_and_tail(path)[0]


def read_rows_and_tail(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows of a metrics file, and whether a torn last line was skipped."""
    if not path.exists():
        return [], False
    lines = path.read_text(encoding="utf-8").split("\n")
    rows, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: the write was cut short
                torn = True
                continue
            raise DataError(f"{path}:{number}: not a JSON row ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise DataError(f"{path}:{number}: a metrics row is an object with an integer 'step'")
        rows.append(row)
    return rows, torn
