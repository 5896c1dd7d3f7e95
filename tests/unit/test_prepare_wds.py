"""WebDataset shards as prepare's input (local files, brace patterns, HTTP URLs): the documents
and tokens of the same texts in a .jsonl, byte-identical output, and bad shards named."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from megatrain.cli.prepare import main
from megatrain.data.manifest import Manifest
from megatrain.data.prepare.pipeline import prepare
from megatrain.data.prepare.sources import file_stamp, iter_documents, resolve_files
from megatrain.data.tar import npy_tokens, tar_samples
from megatrain.errors import DataError
from tests.servers import http_server

PER_SHARD = 20
# Cleaning applies to WebDataset samples as to any record: 3 duplicates and 1 short one dropped.
CLEAN = {"dedup": True, "min_chars": 10}
OPTIONS = {"eval_fraction": 0.0, "shard_tokens": 20_000, "progress": False, **CLEAN}


@pytest.fixture(scope="module")
def texts(corpus_dir: Path) -> list[str]:
    """The small corpus's documents (Shakespeare in ~4 KB groups, the JSONL records), three of
    them again, and one short one."""
    docs = [d.text for d in iter_documents(str(corpus_dir))]
    return docs + docs[:3] + ["tiny\n"]


@pytest.fixture(scope="module")
def wds_dir(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    """``txt/`` and ``json/``: the texts as WebDataset shards written by ``webdataset.ShardWriter``
    (a ``txt`` member, or a ``json`` member with a ``text`` field), and ``ref.jsonl``."""
    root = tmp_path_factory.mktemp("wds")
    for member in ("txt", "json"):
        (root / member).mkdir()
        with wds.ShardWriter(str(root / member / "corpus-%06d.tar"), maxcount=PER_SHARD,
                             verbose=0) as sink:
            for i, text in enumerate(texts):
                value = text if member == "txt" else {"text": text, "id": i}
                sink.write({"__key__": f"sample{i:05d}", member: value})
    (root / "ref.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts),
                                    encoding="utf-8")
    return root


def pattern(folder: Path | str, texts: list[str]) -> str:
    last = (len(texts) - 1) // PER_SHARD
    assert last >= 3  # several shards
    return f"{folder}/corpus-{{000000..{last:06d}}}.tar"


def samples(manifest: Manifest) -> list[tuple[str, np.ndarray, dict]]:
    """(key, tokens, json) of every sample, split by split, shard by shard, in tar order."""
    found = []
    for shards in manifest.splits.values():
        for shard in shards:
            parts, stop = tar_samples(Path(shard.url).read_bytes())
            assert stop is None
            found += [(k, npy_tokens(p["tokens.npy"]), json.loads(bytes(p["json"])))
                      for k, p in parts]
    return found


def hashes(manifest: Manifest) -> list[tuple[str, str]]:
    return [(s.name, s.sha256) for split in manifest.splits.values() for s in split]


@pytest.fixture(scope="module")
def reference(wds_dir: Path, tokenizer_model: Path, tmp_path_factory) -> Manifest:
    """The same texts prepared from the .jsonl."""
    return prepare(str(wds_dir / "ref.jsonl"), tmp_path_factory.mktemp("ref"),
                   tokenizer=str(tokenizer_model), workers=1, **OPTIONS)


@pytest.fixture(scope="module")
def from_txt(wds_dir: Path, texts: list[str], tokenizer_model: Path, tmp_path_factory) -> Manifest:
    """The ``txt`` shards prepared, named by a brace pattern."""
    return prepare(pattern(wds_dir / "txt", texts), tmp_path_factory.mktemp("txt"),
                   tokenizer=str(tokenizer_model), workers=2, **OPTIONS)


def test_txt_shards_give_the_documents_and_tokens_of_the_same_jsonl(
    from_txt: Manifest, reference: Manifest, texts: list[str], wds_dir: Path
) -> None:
    ours, theirs = samples(from_txt), samples(reference)
    assert len(ours) == len(theirs) == len(texts) - 4  # 3 duplicates, 1 short
    for (key, tokens, meta), (_, ref_tokens, ref_meta) in zip(ours, theirs, strict=True):
        assert np.array_equal(tokens, ref_tokens)  # same documents, same order
        assert meta["bytes"] == ref_meta["bytes"]
        assert "." not in key and key.startswith("corpus-0000")
    assert [m["source"] for _, _, m in ours[:PER_SHARD]] == ["corpus-000000.tar"] * PER_SHARD
    stats = from_txt.stats
    assert stats == reference.stats
    assert (stats["dropped_duplicate"], stats["dropped_short"]) == (3, 1)
    assert from_txt.source == pattern(wds_dir / "txt", texts)


def test_json_shards_and_a_second_prepare_give_byte_identical_shards(
    from_txt: Manifest, wds_dir: Path, texts: list[str], tokenizer_model: Path, tmp_path: Path
) -> None:
    # the same texts and shard names: the same keys, so the very same bytes
    from_json = prepare(pattern(wds_dir / "json", texts), tmp_path / "json",
                        tokenizer=str(tokenizer_model), workers=2, **OPTIONS)
    assert hashes(from_json) == hashes(from_txt)
    again = prepare(pattern(wds_dir / "txt", texts), tmp_path / "again",
                    tokenizer=str(tokenizer_model), workers=1, **OPTIONS)
    assert hashes(again) == hashes(from_txt)
    glob = prepare(str(wds_dir / "txt" / "corpus-*.tar"), tmp_path / "glob",
                   tokenizer=str(tokenizer_model), workers=1, **OPTIONS)
    assert hashes(glob) == hashes(from_txt)


def test_shards_at_http_urls_prepare_like_local_ones_and_resume(
    from_txt: Manifest, wds_dir: Path, texts: list[str], tokenizer_model: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = http_server(wds_dir).start()
    try:
        url = pattern(f"http://127.0.0.1:{server.port}/txt", texts)
        out = tmp_path / "o"
        remote = prepare(url, out, tokenizer=str(tokenizer_model), workers=2, **OPTIONS)
        assert hashes(remote) == hashes(from_txt)
        mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
        caplog.set_level("INFO", logger="megatrain")
        again = prepare(url, out, tokenizer=str(tokenizer_model), workers=1, **OPTIONS)
        assert "resuming" in caplog.text  # the URLs' fingerprint is stable: nothing redone
        assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
        assert hashes(again) == hashes(from_txt)
        first = f"http://127.0.0.1:{server.port}/txt/corpus-000000.tar"
        stamp = file_stamp(first)
        assert json.loads(stamp)["size"] == str((wds_dir / "txt" / "corpus-000000.tar").stat().st_size)
        with pytest.raises(DataError, match=r"/txt/nowhere\.tar"):
            file_stamp(first.replace("corpus-000000", "nowhere"))
    finally:
        server.stop()


def test_brace_patterns_keep_their_order_and_name_a_missing_part(wds_dir: Path) -> None:
    files = resolve_files(str(wds_dir / "txt" / "corpus-{000002,000000}.tar"))
    assert [label for _, label in files] == ["corpus-000002.tar", "corpus-000000.tar"]
    with pytest.raises(DataError, match=r"corpus-000099\.tar"):
        resolve_files(str(wds_dir / "txt" / "corpus-{000000,000099}.tar"))
    with pytest.raises(DataError, match="a URL source must name WebDataset .tar shards"):
        resolve_files("https://example.com/docs.jsonl")
    with pytest.raises(DataError, match="carries credentials"):
        resolve_files("https://user:secret@example.com/c-{0..1}.tar")


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def test_a_shard_without_text_is_named_with_what_it_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with wds.ShardWriter(str(tmp_path / "shard-%06d.tar"), verbose=0) as sink:
        sink.write({"__key__": "k0", "jpg": b"\xff\xd8\xff", "cls": 1})
    shard = tmp_path / "shard-000000.tar"
    message = r"shard-000000\.tar: sample 'k0' has no txt or json member \(members: cls, jpg\)"
    with pytest.raises(DataError, match=message):
        list(iter_documents(str(shard)))
    assert main(["--source", str(shard), "--out", str(tmp_path / "o"), "--no-progress",
                 "--vocab-size", "512"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "shard-000000.tar: sample 'k0' has no txt" in err[-1]
    (tmp_path / "meta.tar").write_bytes(tar_of([("k1.json", b'{"body": "no text field"}')]))
    with pytest.raises(DataError, match=r"meta\.tar: sample 'k1': json member: expected a JSON "
                                        r"object with a 'text' field \(see --text-field\)"):
        list(iter_documents(str(tmp_path / "meta.tar")))
    assert [d.text for d in iter_documents(str(tmp_path / "meta.tar"), text_field="body")] == [
        "no text field"]


def test_an_unsafe_member_name_or_a_damaged_tar_is_refused_naming_the_shard(
    tmp_path: Path
) -> None:
    evil = tmp_path / "evil.tar"
    evil.write_bytes(tar_of([("a.txt", b"fine text\n"), ("../x.txt", b"escapes\n"),
                             ("b.txt", b"more\n")]))
    docs = iter_documents(str(evil))
    with pytest.raises(DataError, match=r"evil\.tar: not a readable tar: member '\.\./x\.txt' "
                                        r"at byte 1024 has an unsafe name \(after 1 samples\)"):
        next(docs)  # refused before any of its samples is used
    data = tar_of([("a.txt", b"x" * 3000), ("b.txt", b"y" * 3000)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:5000])
    with pytest.raises(DataError, match=r"cut\.tar: not a readable tar: truncated at byte 5000 \(member needs 7096\)"):
        list(iter_documents(str(cut)))
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 1024)
    with pytest.raises(DataError, match=r"junk\.tar: not a readable tar: bad tar header at byte 0"):
        list(iter_documents(str(tmp_path / "junk.tar")))
