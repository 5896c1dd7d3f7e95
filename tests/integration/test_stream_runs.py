"""The stream in real training runs: an elastic resume audited by data.trace over a mixture of
tinyshakespeare and the stdlib corpus (on disk, and from the local S3 server), corrupt shards
skipped, counted, or stopping the run (served over HTTP), and an HTTP server that goes away."""

from __future__ import annotations

import json
import shutil
import subprocess
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from megatrain.data.manifest import Manifest
from megatrain.data.stream.shard_reader import read_shard
from megatrain.data.stream.trace import read_traces
from tests.integration.helpers import (
    REPO,
    TINY,
    env_for_tests,
    last_step,
    metrics,
    module_command,
    run_module,
    train,
)
from tests.servers import Server, http_server, upload_folder

pytestmark = pytest.mark.integration
SMALL = ("data.seq_len=64", "trainer.micro_batch_size=8", "trainer.eval_every=100000",
         "trainer.eval_steps=2", "trainer.log_every=10")


def _prepare(source: Path, out: Path, tokenizer: Path) -> Manifest:
    result = run_module("prepare", ["--source", str(source), "--out", str(out), "--tokenizer",
                                    str(tokenizer), "--shard-tokens", "1500",
                                    "--eval-fraction", "0.2", "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    return Manifest.load(out)


@pytest.fixture(scope="module")
def small_sources(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str,
                  tokenizer_model: Path) -> tuple[Manifest, Manifest]:
    """~40 KB of tinyshakespeare and 12 small stdlib modules, prepared with one tokenizer."""
    root = tmp_path_factory.mktemp("sources")
    (root / "shakespeare.txt").write_text(shakespeare_text[:40_000], encoding="utf-8")
    stdlib = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py")
                    if 1500 < p.stat().st_size < 5000)[:12]
    lines = [json.dumps({"text": p.read_text(encoding="utf-8")}) for p in stdlib]
    (root / "stdlib.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return (_prepare(root / "shakespeare.txt", root / "shakespeare", tokenizer_model),
            _prepare(root / "stdlib.jsonl", root / "stdlib", tokenizer_model))


def _keys(manifest: Manifest, name: str) -> set[str]:
    return {f"{name}/{key}" for s in manifest.shards("train")
            for key in read_shard(s).keys}


def _mixture(roots: tuple[str, str]) -> str:
    shakespeare, stdlib = roots
    return (f"data.mixture=[{{path: '{shakespeare}', name: shakespeare, weight: 0.5}},"
            f"{{path: '{stdlib}', name: stdlib, weight: 0.5}}]")


@pytest.fixture(scope="module")
def small_sources_s3(s3_corpus, small_sources: tuple[Manifest, Manifest]) -> tuple[str, str]:
    """The two small corpora uploaded to the session's local S3 server."""
    urls = ("s3://corpora/shakespeare", "s3://corpora/stdlib")
    for manifest, url in zip(small_sources, urls, strict=True):
        upload_folder(Path(manifest.root), url)
    return urls


@pytest.mark.parametrize("nproc, workers, store", [(2, 1, "disk"), (1, 2, "s3")],
                         ids=["to-2-ranks-1-worker", "to-1-rank-2-workers-from-s3"])
def test_an_elastic_resume_reads_every_document_once(
        tmp_path: Path, small_sources: tuple[Manifest, Manifest], nproc: int,
        workers: int, store: str, request: pytest.FixtureRequest) -> None:
    """2 ranks × 2 loader workers, data.trace; stopped at step 20 (mid-epoch), then resumed on
    another layout: over both runs each document of epoch 0 is traced exactly once. The second
    case streams both corpora from the local S3 server."""
    run = tmp_path / "run"
    roots = (request.getfixturevalue("small_sources_s3") if store == "s3"
             else tuple(m.root for m in small_sources))
    common = (*SMALL, _mixture(roots), "data.trace=true", "trainer.save_every=20",
              "schedule.total_steps=150")
    train(run, roots[0], "trainer.max_steps=20", "data.num_workers=2", *common, nproc=2)
    assert sorted(read_traces(run)) == [0, 1]
    resumed = train(run, roots[0], "trainer.max_steps=150",
                    f"data.num_workers={workers}", *common, nproc=nproc, check=False)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    seen, later = Counter(), Counter()
    steps = {rank: [line["step"] for line in lines] for rank, lines in read_traces(run).items()}
    for lines in read_traces(run).values():
        for line in lines:
            for key, epoch in zip(line["keys"], line["epochs"], strict=True):
                (seen.update if epoch == 0 else later.update)([(key, epoch)])
    assert steps[0] == list(range(1, 151))
    assert {k for k, _ in seen} == _keys(small_sources[0], "shakespeare") | _keys(
        small_sources[1], "stdlib")
    assert set(seen.values()) == {1} and set(later.values()) <= {1}
    assert any(e > 0 for _, e in later)  # the run went past epoch 0: the check covered it all


def _corrupt_copy(source: Path, out: Path) -> dict[str, int]:
    """A copy of a prepared corpus with one truncated shard, one with a spoilt member and one
    empty: {shard: samples lost}."""
    shutil.copytree(source, out)
    shards = Manifest.load(out).shards("train")
    data = shards[0].path.read_bytes()
    shards[0].path.write_bytes(data[: len(data) // 2])
    data = bytearray(shards[1].path.read_bytes())
    at = data.index(b"\x93NUMPY")
    data[at : at + 6] = b"garbag"
    shards[1].path.write_bytes(bytes(data))
    shards[2].path.write_bytes(b"")
    return {s.name: read_shard(s).bad for s in shards[:3]}


def test_corrupt_shards_are_skipped_and_counted_or_stop_the_run(
        tmp_path: Path, small_sources: tuple[Manifest, Manifest]) -> None:
    """The corrupt corpus is served over HTTP: faults are isolated the same way as on disk."""
    lost = _corrupt_copy(small_sources[0].root, tmp_path / "corrupt")
    assert all(n > 0 for n in lost.values())
    server = http_server(tmp_path).start()
    data = f"http://127.0.0.1:{server.port}/corrupt"
    run = tmp_path / "run"
    train(run, data, *SMALL, "trainer.max_steps=150", "trainer.save_every=150",
          "data.max_skip_fraction=0.9", "data.num_workers=2")
    rows = [r for r in metrics(run) if "loss" in r]
    assert rows[-1]["step"] == 150 and rows[-1]["data_skipped"] >= sum(lost.values())
    state = torch.load(run / "checkpoints" / "step_150" / "rank0.pt", weights_only=False)
    assert state["stream"]["skipped"]["0"] == sum(lost.values())
    assert set(state["stream"]["bad_shards"]) == set(lost)

    failed = train(tmp_path / "run2", data, *SMALL, "trainer.max_steps=150",
                   "data.max_skip_fraction=0.01", check=False)
    server.stop()
    assert failed.returncode == 2, failed.stderr[-3000:]
    message = failed.stderr.strip().splitlines()[-1]
    assert "max_skip_fraction=0.01" in message and any(name in message for name in lost)
    assert "Traceback" not in failed.stderr


def _train_through_outage(run: Path, server: Server, data: str, *overrides: str,
                          outage: float | None) -> subprocess.CompletedProcess[str]:
    """Train from ``data`` (a URL of ``server``); once step 4 is logged, stop the server for
    ``outage`` seconds (None: for good)."""
    args = [*TINY, *SMALL, f"data.train={data}", f"run.dir={run}", "trainer.log_every=1",
            "trainer.save_every=100000", *overrides]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(module_command("train", args), cwd=REPO, env=env_for_tests(),
                                   stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + 120
        while last_step(run) < 4 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            server.stop()
            if outage is not None:
                time.sleep(outage)
                server.start()
            process.wait(timeout=180)  # never a hang
        finally:
            process.kill()  # a hung run must not outlive its test
            process.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, process.returncode, out.read(), err.read())


def test_a_server_gone_mid_run_is_waited_for_or_named(
        tmp_path: Path, small_sources: tuple[Manifest, Manifest]) -> None:
    """Back within the retries: the run goes on and skips nothing. Gone for good: the run exits
    non-zero naming the shard's URL, after data.retries, without skipping more than the budget."""
    server = http_server(Path(small_sources[0].root).parent).start()
    url = f"http://127.0.0.1:{server.port}/{Path(small_sources[0].root).name}"
    try:
        back = _train_through_outage(tmp_path / "back", server, url, "trainer.max_steps=60",
                                     outage=2.0)
        assert back.returncode == 0, back.stderr[-3000:]
        rows = [r for r in metrics(tmp_path / "back") if "loss" in r]
        assert [r["step"] for r in rows] == list(range(1, 61))
        assert rows[-1]["data_skipped"] == 0 and "retrying in" in back.stderr

        gone = _train_through_outage(tmp_path / "gone", server, url, "trainer.max_steps=400",
                                     "data.retries=1", outage=None)
        assert gone.returncode == 2, gone.stderr[-3000:]
        message = gone.stderr.strip().splitlines()[-1]
        assert "data.max_skip_fraction" in message and f"{url}/train-" in message
        assert "failed after 2 attempts" in message
    finally:
        server.stop()
