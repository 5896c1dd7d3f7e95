from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def prepared_dir(prepared) -> Path:
    """The folder of the session's small prepared corpus (tests/conftest.py)."""
    return prepared.root
