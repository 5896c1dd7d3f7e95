"""Fixtures of the unit tests."""

from __future__ import annotations

import os
import unittest.mock
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

ONE_RANK_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}


@pytest.fixture(scope="session")
def _one_rank_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A one-rank process group in this process, as DeepSpeed wants one; once a session, as
    DeepSpeed keeps the first group it was given. A file store, not a TCP port: the process
    tests beside this one take free ports at the same time."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is first imported
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group(get_accelerator().communication_backend_name(), store=store,
                            rank=0, world_size=1)
    with unittest.mock.patch.dict(os.environ, ONE_RANK_ENV):
        deepspeed.init_distributed(get_accelerator().communication_backend_name())
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_rank(_one_rank_group: None) -> Iterator[None]:
    """One rank of a one-rank DeepSpeed world: the process group and its environment."""
    with unittest.mock.patch.dict(os.environ, ONE_RANK_ENV):
        yield
