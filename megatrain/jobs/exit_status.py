"""The trainer's exit code, told to the launcher that started it.

torchrun turns any failing worker into its own exit code 1, so "75: saved on a signal, requeue me"
and "2: wrong config, don't retry" (``megatrain.errors``) never reach a launch script. When
``MEGATRAIN_EXIT_STATUS`` names a file, the first process of each node (``LOCAL_RANK`` 0) writes
one JSON line there as it ends: ``{"exit_code": 75, "message": "...", "result": {...}}``.
A node-local path works on every node (no shared file system needed); all ranks reach the same
outcome (the stop decision is collective, config errors are deterministic). No file means the
trainer never got that far (a Hydra composition error, a kill): the launcher keeps torchrun's code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megatrain.errors import EXIT_CONFIG, EXIT_OK, EXIT_REQUEUE

EXIT_STATUS_ENV = "MEGATRAIN_EXIT_STATUS"

MEANINGS = {
    EXIT_OK: "finished",
    EXIT_CONFIG: "configuration or input error: fix it, a retry cannot help",
    EXIT_REQUEUE: "stopped on a signal after saving: run the same command again to resume",
}


def record_exit(exit_code: int, message: str, result: dict[str, float] | None = None) -> None:
    """Write the exit status where ``MEGATRAIN_EXIT_STATUS`` points (no-op when unset)."""
    path = os.environ.get(EXIT_STATUS_ENV)
    if not path or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    status = {"exit_code": exit_code, "message": message, "result": result or {}}
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status) + "\n", encoding="utf-8")
    tmp.replace(target)  # atomic: a reader never sees half a file


def read_exit_status(path: Path) -> dict[str, Any] | None:
    """The status a trainer wrote, or None when there is none (it never got that far)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def describe(exit_code: int) -> str:
    """What an exit code means for whoever decides to retry."""
    return MEANINGS.get(exit_code, "crashed: look at the log, a retry will probably not help")
