"""Elastic resume on real processes: a checkpoint moves to another number of ranks or another
ZeRO stage; the weights arrive unchanged, the data continues exactly once, the loss goes on."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from tests.integration.helpers import losses, train

pytestmark = pytest.mark.integration

COMMON = ("trainer.log_every=1", "trainer.save_every=6", "trainer.eval_every=6",
          "trainer.eval_steps=1000", "schedule.total_steps=12", "data.trace=true",
          "data.num_workers=1")


def _trace_keys(run_dir: Path) -> list[str]:
    keys = []
    for path in sorted((run_dir / "data_trace").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            keys.extend(f"{e}:{k}" for k, e in zip(json.loads(line)["keys"],
                                                   json.loads(line)["epochs"], strict=True))
    return keys


CHECKSUM = re.compile(r"resumed from .* \(weights checksum ([0-9.e+-]+), saved ([0-9.e+-]+)\)")


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> dict[tuple, Path]:
    """Runs stopped at step 6, by (ranks, ZeRO stage)."""
    runs = {}
    for nproc, stage in ((2, 2), (1, 2)):
        run_dir = tmp_path_factory.mktemp(f"r{nproc}z{stage}") / "run"
        train(run_dir, prepared_dir, "trainer.max_steps=6", f"deepspeed.zero_stage={stage}",
              *COMMON, nproc=nproc)
        runs[(nproc, stage)] = run_dir
    return runs


@pytest.mark.parametrize("before, after", [((2, 2), (1, 2)), ((1, 2), (2, 2)),
                                           ((2, 2), (2, 3))],
                         ids=["2to1-ranks", "1to2-ranks", "zero2to3"])
def test_resume_on_another_layout(tmp_path: Path, prepared_dir: Path, six_steps: dict,
                                  before: tuple[int, int], after: tuple[int, int]) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps[before], run_dir)
    nproc, stage = after
    resumed = train(run_dir, prepared_dir, "trainer.max_steps=12",
                    f"deepspeed.zero_stage={stage}", *COMMON, nproc=nproc)
    assert "universal checkpoint" in resumed.stderr
    loaded, saved = (float(x) for x in CHECKSUM.search(resumed.stderr).groups())
    assert math.isclose(loaded, saved, rel_tol=1e-12)  # the same weights, re-split

    logged = losses(run_dir)
    assert sorted(logged) == list(range(1, 13))
    assert abs(logged[7] - logged[6]) < 0.3 and logged[12] < logged[1]  # continuous, learning
    keys = _trace_keys(run_dir)
    assert keys and len(keys) == len(set(keys))  # no document read twice across the change
