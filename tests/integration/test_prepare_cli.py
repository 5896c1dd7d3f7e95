"""megatrain-prepare as a real process on the stdlib corpus: determinism, --verify, and a
prepare killed with SIGKILL that continues where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatrain.data.manifest import Manifest, sha256_file
from megatrain.data.prepare.journal import JOURNAL
from tests.integration.helpers import REPO

pytestmark = pytest.mark.integration

# A small vocabulary and sample keep tokenizer training to a few seconds; ~14M tokens in shards
# of 500k give ~30 shards, so a kill lands with most of the work still to do.
OPTIONS = ["--shard-tokens", "500000", "--eval-fraction", "0.02", "--seed", "3", "--no-progress"]
TRAIN = ["--vocab-size", "1024", "--tokenizer-sample", "20000"]


def prepare_cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "megatrain.prepare", "--source", "stdlib", "--out", str(out),
            *OPTIONS, *args]


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def shard_hashes(folder: Path) -> dict[str, str]:
    manifest = Manifest.load(folder)
    hashes = {s.name: sha256_file(s.path) for v in manifest.splits.values() for s in v}
    assert hashes == {s.name: s.sha256 for v in manifest.splits.values() for s in v}
    return hashes


@pytest.fixture(scope="module")
def stdlib_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stdlib corpus prepared once, uninterrupted, with a tokenizer trained on it."""
    out = tmp_path_factory.mktemp("stdlib") / "a"
    run(prepare_cmd(out, *TRAIN, "--workers", "2"))
    return out


def test_two_stdlib_prepares_are_identical_and_verify_catches_a_flipped_byte(
    stdlib_prepared: Path, tmp_path: Path
) -> None:
    second = tmp_path / "b"
    run(prepare_cmd(second, *TRAIN, "--workers", "2"))
    first_hashes = shard_hashes(stdlib_prepared)
    assert len(first_hashes) > 20
    assert shard_hashes(second) == first_hashes
    tokenizer = "tokenizer.model"
    assert sha256_file(second / tokenizer) == sha256_file(stdlib_prepared / tokenizer)

    verify = [sys.executable, "-m", "megatrain.prepare", "--verify", str(second)]
    ok = run(verify)
    assert ok.stdout.count("ok ") == len(first_hashes) + 1 and "BAD" not in ok.stdout
    victim = second / "train-000007.tar"
    with victim.open("r+b") as f:
        f.seek(victim.stat().st_size // 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    bad = subprocess.run(verify, check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    assert [line.split()[2] for line in bad.stdout.splitlines() if line.startswith("BAD")] == [
        "train-000007.tar"]
    assert "train-000007.tar" in bad.stderr


def journaled_shards(out: Path) -> list[str]:
    path = out / JOURNAL
    if not path.is_file():
        return []
    names = []
    for line in path.read_text().splitlines():
        try:
            names += [json.loads(line)["shard"]["name"]] if '"shard"' in line else []
        except ValueError:
            break  # a line being written right now
    return names


def test_a_killed_prepare_continues_where_it_stopped(stdlib_prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "k"
    given = ["--tokenizer", str(stdlib_prepared / "tokenizer.model")]
    proc = subprocess.Popen(prepare_cmd(out, *given, "--workers", "1"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(journaled_shards(out)) < 3:
        assert proc.poll() is None, f"prepare ended before it could be killed: {proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = journaled_shards(out)
    assert not (out / "manifest.json").exists()
    assert len(done) < len(shard_hashes(stdlib_prepared)) // 2  # killed early: most is left
    before = {name: (out / name).stat().st_mtime_ns for name in done}

    resumed = run(prepare_cmd(out, *given, "--workers", "2"))
    assert "resuming" in resumed.stderr
    assert shard_hashes(out) == shard_hashes(stdlib_prepared)
    assert {name: (out / name).stat().st_mtime_ns for name in done} == before  # not rewritten
    assert not list(out.glob("*.tmp"))
    stats, reference = Manifest.load(out).stats, Manifest.load(stdlib_prepared).stats
    assert stats == reference
