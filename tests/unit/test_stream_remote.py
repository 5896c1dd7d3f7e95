"""Corpora at URLs, against real local servers (HTTP with ranges, moto's S3): the same batches
as from disk, retries that name the URL, the shard cache, and inputs that stay data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from megatrain.data import storage
from megatrain.data.manifest import Manifest
from megatrain.data.stream.shard_reader import ShardCache, ShardIO, read_shard
from megatrain.errors import DataError
from tests.servers import http_server
from tests.unit.stream_corpus import make_corpus
from tests.unit.test_stream import stream, take

LENGTHS = [5 + (7 * k) % 23 for k in range(40)]


def input_ids(manifest: Manifest, n: int, **overrides) -> list[np.ndarray]:
    return [b["input_ids"].numpy() for b in take(stream(manifest, **overrides), n)]


@pytest.mark.parametrize("store", ["http", "s3"])
def test_a_corpus_at_a_url_streams_the_same_batches_as_from_disk(
        store: str, prepared, http_corpus, s3_corpus, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEGATRAIN_CACHE", str(tmp_path))
    url = (http_corpus if store == "http" else s3_corpus)[1]
    remote = Manifest.load(url)
    assert remote.is_remote and remote.shards("train") != prepared.shards("train")
    assert [s.sha256 for s in remote.shards("train")] == [s.sha256 for s in prepared.shards("train")]
    tokenizer = remote.fetch_tokenizer(tmp_path)
    assert tokenizer.read_bytes() == Path(prepared.tokenizer_path).read_bytes()
    for workers in (0, 1):
        local = input_ids(prepared, 12, num_workers=workers)
        got = input_ids(remote, 12, num_workers=workers)
        assert all(np.array_equal(a, b) for a, b in zip(local, got, strict=True))


def test_a_corpus_read_through_a_pipe_command_streams_the_same_batches(prepared) -> None:
    remote = Manifest.load(f"pipe:cat {prepared.root}/{{}}")
    assert remote.shards("train")[0].url == f"pipe:cat {prepared.root}/train-000000.tar"
    assert remote.name == Path(prepared.root).name
    local, got = input_ids(prepared, 8), input_ids(remote, 8)
    assert all(np.array_equal(a, b) for a, b in zip(local, got, strict=True))


def test_a_missing_corpus_or_shard_at_a_url_is_named(http_corpus) -> None:
    _, url = http_corpus
    with pytest.raises(DataError, match=r"http://127\.0\.0\.1:\d+/nowhere/manifest.json does "
                                        "not exist"):
        Manifest.load(url.rsplit("/", 1)[0] + "/nowhere")
    shard = Manifest.load(url).shards("train")[0]
    gone = dataclasses.replace(shard, url=shard.url + ".gone")
    start = time.monotonic()
    read = read_shard(gone, ShardIO(retries=3, backoff_s=5))
    assert time.monotonic() - start < 5, "a missing object is not retried"
    assert read.bad == shard.samples and gone.url in read.errors[0]


@pytest.fixture
def served(tmp_path: Path):
    """A small corpus behind an HTTP server of its own, which a test may stop and restart."""
    make_corpus(tmp_path / "c", LENGTHS, shards=4)
    server = http_server(tmp_path).start()
    yield server, Manifest.load(f"http://127.0.0.1:{server.port}/c")
    server.stop()


def test_a_stopped_server_is_retried_and_the_read_continues_when_it_is_back(served) -> None:
    server, manifest = served
    shard = manifest.shards("train")[1]
    server.stop()
    restart = threading.Timer(1.0, server.start)
    restart.start()
    read = read_shard(shard, ShardIO(retries=4, backoff_s=0.4))  # waits 0.4 + 0.8 + 1.6 s
    restart.join()
    assert read.bad == 0 and read.errors == []


def test_a_server_that_stays_down_fails_the_shard_naming_its_url(served, caplog) -> None:
    server, manifest = served
    shard = manifest.shards("train")[0]
    server.stop()
    read = read_shard(shard, ShardIO(retries=2, backoff_s=0.05))
    assert read.bad == shard.samples
    assert f"{shard.url}: failed after 3 attempts" in read.errors[0]
    assert sum("retrying in" in r.message for r in caplog.records) == 2


def test_a_shard_that_does_not_match_its_sha256_is_fetched_again_then_isolated(
        served, tmp_path: Path, caplog) -> None:
    _, manifest = served
    shard = manifest.shards("train")[0]
    path = tmp_path / "c" / shard.name
    data = bytearray(path.read_bytes())
    at = data.index(b"\x93NUMPY")
    data[at: at + 6] = b"garbag"  # the first sample's tokens
    path.write_bytes(bytes(data))
    read = read_shard(shard)
    assert read.bad == 1 and read.tokens[1] is not None
    assert sum("does not match the sha256" in r.message for r in caplog.records) == 2


def test_the_shard_cache_serves_a_second_read_without_the_server(served, tmp_path: Path) -> None:
    server, manifest = served
    io = ShardIO(retries=0, cache_dir=str(tmp_path / "cache"), cache_bytes=1 << 30)
    first = [read_shard(s, io) for s in manifest.shards("train")]
    server.stop()
    again = [read_shard(s, io) for s in manifest.shards("train")]
    assert all(r.bad == 0 for r in again)
    assert [[t.tolist() for t in r.tokens] for r in again] == \
        [[t.tolist() for t in r.tokens] for r in first]


def test_the_cache_never_uses_a_half_written_or_damaged_file_and_stays_bounded(
        tmp_path: Path) -> None:
    blobs = {hashlib.sha256(b).hexdigest(): b for b in (bytes([i]) * 1000 for i in range(5))}
    cache = ShardCache(tmp_path, max_bytes=2500)
    shas = list(blobs)
    (tmp_path / f".{shas[0]}.123.tmp").write_bytes(blobs[shas[0]][:500])  # a writer that died
    assert cache.get(shas[0]) is None
    for sha in shas[:2]:
        cache.put(sha, blobs[sha])
    (tmp_path / f"{shas[1]}.tar").write_bytes(b"x" * 1000)  # damaged on disk
    assert cache.get(shas[1]) is None and not (tmp_path / f"{shas[1]}.tar").exists()
    for sha in shas[2:4]:
        time.sleep(0.01)
        cache.put(sha, blobs[sha])
    time.sleep(0.01)
    assert cache.get(shas[2]) == blobs[shas[2]]  # read again: now more recent than shas[3]
    time.sleep(0.01)
    cache.put(shas[4], blobs[shas[4]])  # 3000 bytes: the least recently used go
    assert {p.stem for p in tmp_path.glob("*.tar")} == {shas[2], shas[4]}
    assert sum(p.stat().st_size for p in tmp_path.glob("*.tar")) <= 2500


def test_a_shard_larger_than_its_manifest_says_is_not_read_whole(served, tmp_path: Path) -> None:
    _, manifest = served
    shard = manifest.shards("train")[2]
    (tmp_path / "c" / shard.name).write_bytes(b"\0" * (shard.nbytes * 50))
    read = read_shard(shard, ShardIO(retries=0))
    assert read.bad == shard.samples
    assert f"holds more than the {shard.nbytes} bytes expected" in read.errors[0]


@pytest.mark.parametrize("name", ["../x.tar", "/etc/passwd", "sub/x.tar", ".hidden"])
def test_a_manifest_cannot_name_a_file_outside_its_folder(prepared, tmp_path: Path,
                                                          name: str) -> None:
    data = json.loads((Path(prepared.root) / "manifest.json").read_text())
    data["splits"]["train"][0]["name"] = name
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="is not a plain file name"):
        Manifest.load(tmp_path)


def test_credentials_in_a_url_are_refused_and_never_echoed() -> None:
    secret = "hunter2secret"
    for url in (f"https://user:{secret}@host/corpus",
                f"https://host/c/manifest.json?X-Amz-Signature={secret}"):
        assert secret not in storage.redact(f"failed: {url} (boom)")
        with pytest.raises(ValueError, match="carries credentials") as err:
            storage.check_no_credentials(url, "data.train")
        assert secret not in str(err.value)
    storage.check_no_credentials("s3://bucket/corpus", "data.train")
