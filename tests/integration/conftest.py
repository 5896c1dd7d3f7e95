from pathlib import Path

import pytest

from tests.integration.helpers import train


@pytest.fixture(scope="session")
def prepared_dir(prepared) -> Path:
    """The folder of the session's small prepared corpus (tests/conftest.py)."""
    return prepared.root


@pytest.fixture(scope="session")
def trained_gpt(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    """The run folder of a tiny GPT trained for 60 steps (a loss logged every step), for the
    tests that start from a trained checkpoint."""
    run = tmp_path_factory.mktemp("trained_gpt") / "run"
    train(run, prepared_dir, "trainer.max_steps=60", "optim.lr=3e-3", "trainer.log_every=1",
          "trainer.eval_every=1000", "trainer.save_every=1000")
    return run
