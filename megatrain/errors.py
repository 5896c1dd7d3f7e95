"""Errors and exit codes that launchers rely on.

A launcher (SLURM requeue logic, a sweep) reads the exit code: ``EXIT_REQUEUE`` means "stopped on
a signal after saving: run the same command again"; ``EXIT_CONFIG`` means "the input is wrong,
don't retry"; anything else non-zero is a crash.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_REQUEUE = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, retrying is expected to work


class MegatrainError(Exception):
    """Base class for errors that megatrain reports as a short message instead of a traceback."""

    exit_code = 1
    label = "error"  # how the one-line message starts


class ConfigError(MegatrainError):
    """The configuration or the input it names is wrong; retrying will not help."""

    exit_code = EXIT_CONFIG


class DataError(MegatrainError):
    """A shard, manifest or tokenizer is missing or unreadable."""

    exit_code = EXIT_CONFIG
