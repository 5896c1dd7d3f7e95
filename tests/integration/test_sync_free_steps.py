"""The training hot path reads nothing back from the device between log steps (what a GPU would
wait for): a real in-process Trainer counts every ``item`` / ``tolist`` / ``bool`` / ``float`` /
``int`` of a device tensor over steps that neither log, evaluate nor save (tests/sync_probe.py).
The non-finite guard is one documented sync per step (``trainer.skip_nonfinite``): without it
there must be none; with it, only the guard's own read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import REPO, TINY, env_for_tests

QUIET = ["trainer.log_every=1000", "trainer.eval_every=1000", "trainer.save_every=1000",
         "trainer.max_steps=1000"]


def _probe(tmp_path: Path, data: Path, *overrides: str) -> dict:
    out = tmp_path / "probe.json"
    args = [*TINY, *QUIET, f"data.train={data}", f"run.dir={tmp_path / 'run'}", *overrides]
    result = subprocess.run([sys.executable, "-m", "tests.sync_probe", str(out), *args],
                            cwd=REPO, env=env_for_tests(), capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("family", ["gpt2-tiny", "bert-tiny"])
def test_no_host_reads_between_log_steps(tmp_path: Path, prepared_dir: Path,
                                         family: str) -> None:
    found = _probe(tmp_path, prepared_dir, f"model={family}", "trainer.skip_nonfinite=false",
                   "trainer.grad_accum_steps=2")
    assert found["reads"] == []


def test_the_nonfinite_guard_is_the_one_read(tmp_path: Path, prepared_dir: Path) -> None:
    reads = _probe(tmp_path, prepared_dir)["reads"]
    assert reads and all("numerics.py" in r and "check" in r for r in reads), reads
