"""Fixtures for the launch tests: the small prepared corpus, a running SLURM cluster, and the
uninterrupted 2-rank torchrun run that the SLURM and multi-node runs must match."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.helpers import train
from tests.launch.helpers import RUN, slurm_unavailable


@pytest.fixture(scope="session")
def prepared_dir(prepared) -> Path:
    """The folder of the session's small prepared corpus (tests/conftest.py)."""
    return prepared.root


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Skip (with the reason) unless a SLURM cluster here accepts 2-CPU jobs."""
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    """Plain torchrun, 2 processes, never interrupted: what every launch path must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(run_dir, prepared_dir, *RUN, nproc=2, torchrun=True)
    return run_dir
