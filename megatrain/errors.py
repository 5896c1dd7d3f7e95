"""Errors and exit codes that launchers rely on.

A launcher (SLURM requeue logic, a sweep) reads the exit code: ``EXIT_CONFIG`` means "the input is
wrong, don't retry"; anything else non-zero is a crash.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CONFIG = 2


class MegatrainError(Exception):
    """Base class for errors that megatrain reports as a short message instead of a traceback."""

    exit_code = 1


class ConfigError(MegatrainError):
    """The configuration or the input it names is wrong; retrying will not help."""

    exit_code = EXIT_CONFIG


class DataError(MegatrainError):
    """A shard, manifest or tokenizer is missing or unreadable."""

    exit_code = EXIT_CONFIG
