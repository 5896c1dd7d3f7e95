"""``megatrain-prepare --out s3://…`` against a local S3 server (moto): the corpus at the URL is
the one a local prepare writes, --verify reads it there, and an interrupted prepare continues —
on the same machine or on another one (an empty staging folder) — to the same result."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from megatrain.cli.prepare import main
from megatrain.data import storage
from megatrain.data.manifest import Manifest
from megatrain.data.prepare.journal import JOURNAL
from megatrain.data.prepare.pipeline import prepare
from megatrain.data.prepare.remote_out import staging_dir

# the options of the session's ``prepared`` corpus (tests/conftest.py), which is the reference
OPTIONS = {"eval_fraction": 0.05, "shard_tokens": 20_000, "progress": False}


def hashes(manifest: Manifest) -> dict[str, list[tuple[str, str, int]]]:
    return {split: [(s.name, s.sha256, s.nbytes) for s in shards]
            for split, shards in manifest.splits.items()}


def object_sha256(url: str) -> str:
    return hashlib.sha256(storage.read_bytes(url, limit=1 << 30)).hexdigest()


def test_out_url_holds_what_a_local_prepare_writes_and_verifies_there(
    s3_corpus, prepared: Manifest, corpus_dir: Path, tokenizer_model: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setenv("MEGATRAIN_CACHE", str(tmp_path / "cache"))
    url = "s3://corpora/prepared-here"
    assert main(["--source", str(corpus_dir), "--out", url, "--tokenizer", str(tokenizer_model),
                 "--eval-fraction", "0.05", "--shard-tokens", "20000", "--workers", "1",
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith(f"prepared {url}: ")
    remote = Manifest.load(url)
    assert hashes(remote) == hashes(prepared)
    assert (remote.stats, remote.tokenizer) == (prepared.stats, prepared.tokenizer)
    for shard in remote.splits["train"]:  # the objects are the bytes the manifest names
        assert object_sha256(shard.url) == shard.sha256
    assert object_sha256(f"{url}/tokenizer.model") == prepared.tokenizer["sha256"]
    assert storage.exists(f"{url}/{JOURNAL}")
    assert not staging_dir(url).exists()  # the staging folder is gone once the manifest is up

    assert main(["--verify", url]) == 0
    assert f"verified {url}: " in capsys.readouterr().out
    victim = remote.splits["train"][1]
    data = bytearray(storage.read_bytes(victim.url, limit=victim.nbytes))
    data[2000] ^= 0x01
    storage.write_bytes(victim.url, bytes(data))
    assert main(["--verify", url]) == 2
    bad = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and victim.name in bad[0] and "sha256 differs" in bad[0]

    # other options: a fresh start, which leaves no shard of the earlier corpus at the URL
    fewer = prepare(str(corpus_dir), url, tokenizer=str(tokenizer_model), workers=1,
                    **(OPTIONS | {"shard_tokens": 60_000}))
    assert fewer.root == url and fewer.splits["train"][0].url == f"{url}/train-000000.tar"
    assert len(fewer.splits["train"]) < len(remote.splits["train"])
    fs, root = storage.filesystem(url)
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    assert names == sorted([JOURNAL, "manifest.json", "tokenizer.model",
                            *(s.name for v in fewer.splits.values() for s in v)])
    assert main(["--verify", url]) == 0


class Killed(BaseException):
    """Stands for SIGKILL: nothing in prepare catches it."""


@pytest.mark.parametrize("machine", ["same", "another"])
def test_an_interrupted_prepare_to_a_url_continues_to_the_same_corpus(
    machine: str, s3_corpus, prepared: Manifest, corpus_dir: Path, tokenizer_model: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("MEGATRAIN_CACHE", str(tmp_path / "cache"))
    url = f"s3://corpora/interrupted-{machine}"
    real_upload = storage.upload
    uploads: list[str] = []
    kill = [True]

    def upload(local: Path, location: str) -> None:
        real_upload(local, location)
        uploads.append(location.rsplit("/", 1)[-1])
        if kill[0] and uploads[-1] == "train-000003.tar":
            # killed between a shard's upload and the journal's: the URL holds a shard that
            # its journal does not list
            kill[0] = False
            raise Killed

    monkeypatch.setattr(storage, "upload", upload)
    with pytest.raises(Killed):
        prepare(str(corpus_dir), url, tokenizer=str(tokenizer_model), workers=1, **OPTIONS)
    assert not storage.exists(f"{url}/manifest.json")
    assert storage.exists(f"{url}/train-000003.tar")
    journaled = [n for n in uploads if n.startswith("train-")][:-1]
    assert journaled == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    if machine == "another":
        monkeypatch.setenv("MEGATRAIN_CACHE", str(tmp_path / "elsewhere"))
        assert not staging_dir(url).exists()

    uploads.clear()
    caplog.set_level("INFO", logger="megatrain")
    resumed = prepare(str(corpus_dir), url, tokenizer=str(tokenizer_model), workers=1, **OPTIONS)
    assert "resuming s3://corpora/interrupted" in caplog.text and "3 train shards" in caplog.text
    assert not set(journaled) & set(uploads)  # finished shards are not written again
    assert "train-000003.tar" in uploads and uploads[-1] == JOURNAL
    assert hashes(Manifest.load(url)) == hashes(resumed) == hashes(prepared)
    assert Manifest.load(url).stats == prepared.stats  # the statistics cover the kept shards
    assert not staging_dir(url).exists()
