"""launch/torchrun.sh as real processes: two "nodes" on this machine (c10d rendezvous on
localhost) train exactly like one node with two processes. (That it exits with the trainer's own
exit code, 75 or 2, where torchrun alone says 1, is checked through SLURM in test_slurm.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.helpers import REPO, _free_port
from tests.launch.helpers import TORCHRUN_SH, launch_env, same_metrics, train_args

pytestmark = pytest.mark.integration


def _torchrun_sh(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["bash", str(TORCHRUN_SH), *args], cwd=REPO, env=launch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_nodes_c10d_on_localhost_match_one_node(tmp_path: Path, prepared_dir: Path,
                                                    reference_run: Path) -> None:
    run_dir = tmp_path / "two_nodes"
    node = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "--rdzv-id", "two-nodes", "--",
            *train_args(prepared_dir), f"run.dir={run_dir}"]
    nodes = [_torchrun_sh(*node) for _ in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in nodes]
    assert [proc.returncode for proc in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "2 rank(s)" in "".join(outputs)  # one world of two ranks, not two worlds of one
    same_metrics(run_dir, reference_run)


def test_bad_arguments_fail_with_usage() -> None:
    proc = _torchrun_sh("--nnodes", "2", "model=gpt2-tiny")
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2
    assert "needs --master-addr" in output
