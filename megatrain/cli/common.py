"""What every command shares: a ``MegatrainError`` becomes one line on stderr and its exit code
(2: the input is wrong, don't retry; 75: saved on a signal, requeue; 1: anything else)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from megatrain.errors import MegatrainError


def report(err: MegatrainError, label: str | None = None) -> int:
    """Print ``err`` as one line (``<label>: <message>``); its exit code."""
    print(f"{label or err.label}: {err}", file=sys.stderr, flush=True)
    return err.exit_code


def run_command(command: Callable[[], int], label: str | None = None) -> int:
    """``command()``'s exit code, or a reported MegatrainError's."""
    try:
        return command()
    except MegatrainError as err:
        return report(err, label)
