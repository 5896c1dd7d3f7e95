"""prepare: shards match the manifest and the source text; determinism; errors; the cache."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from megatrain.cli.prepare import main
from megatrain.data.manifest import Manifest, sha256_file
from megatrain.data.prepare.pipeline import ensure_prepared, prepare, unigram_entropy
from megatrain.data.prepare.sources import chunk_text, iter_documents, resolve_files
from megatrain.data.tar import npy_tokens, tar_samples
from megatrain.data.tokenizer import load_tokenizer
from megatrain.errors import ConfigError, DataError


def read_split(manifest: Manifest, split: str) -> dict[str, dict]:
    """key → {"tokens", "meta", "shard"} for every sample of a split, read with webdataset."""
    samples = {}
    for shard in manifest.splits[split]:
        pipeline = wds.DataPipeline(
            wds.SimpleShardList([str(shard.path)]), wds.tarfile_to_samples()
        )
        for s in pipeline:
            assert s["__key__"] not in samples
            tokens = np.load(io.BytesIO(s["tokens.npy"]))
            samples[s["__key__"]] = {
                "tokens": tokens,
                "meta": json.loads(s["json"]),
                "shard": shard.name,
            }
    return samples


def test_manifest_matches_shard_contents(prepared: Manifest) -> None:
    for split in ("train", "eval"):
        samples = read_split(prepared, split)
        for shard in prepared.splits[split]:
            in_shard = [s for s in samples.values() if s["shard"] == shard.name]
            assert shard.samples == len(in_shard) > 0
            assert shard.tokens == sum(len(s["tokens"]) for s in in_shard)
            assert shard.sha256 == sha256_file(shard.path)
        assert prepared.stats[f"{split}_tokens"] == sum(len(s["tokens"]) for s in samples.values())
        assert all(s["tokens"].dtype == np.uint16 for s in samples.values())
    assert len(prepared.splits["train"]) >= 5  # rolled over at shard_tokens
    assert prepared.tokenizer["sha256"] == sha256_file(prepared.tokenizer_path)


def test_tokens_decode_back_to_the_source_documents(prepared: Manifest, corpus_dir: Path) -> None:
    samples = read_split(prepared, "train") | read_split(prepared, "eval")
    tok = load_tokenizer(prepared.tokenizer_path)
    docs = [d for d in iter_documents(str(corpus_dir)) if d.text]
    assert sorted(samples) == sorted(d.key for d in docs)  # the empty JSONL record is skipped
    assert prepared.stats["documents"] == len(docs)
    for doc in docs:
        sample = samples[doc.key]
        assert tok.decode(sample["tokens"].tolist()) == doc.text
        assert sample["meta"] == {"source": doc.source, "bytes": len(doc.text.encode())}
        assert tok.eos_id not in sample["tokens"]  # the packer adds EOS, not the shards


def test_plain_webdataset_decodes_the_shards_as_docs_data_md_shows(
    prepared: Manifest, corpus_dir: Path
) -> None:
    """docs/data.md: ``wds.WebDataset(urls, shardshuffle=False).decode()`` gives each sample's
    ids as a 1-d uint16 array under "tokens.npy" and its metadata as a dict under "json"."""
    urls = [shard.url for shard in prepared.shards("train")]
    decoded = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(decoded) == prepared.stats["train_documents"]
    tok = load_tokenizer(prepared.tokenizer_path)
    docs = {d.key: d for d in iter_documents(str(corpus_dir))}
    ours = []  # megatrain's own reader, shard by shard in tar order
    for shard in prepared.shards("train"):
        ours += [(key, npy_tokens(parts["tokens.npy"]))
                 for key, parts in tar_samples(shard.path.read_bytes())[0]]
    assert [s["__key__"] for s in decoded] == [key for key, _ in ours]
    assert all(np.array_equal(s["tokens.npy"], t) for s, (_, t) in zip(decoded, ours))
    for sample in decoded:
        tokens, doc = sample["tokens.npy"], docs[sample["__key__"]]
        assert isinstance(tokens, np.ndarray) and tokens.dtype == np.uint16 and tokens.ndim == 1
        assert tok.decode(tokens.tolist()) == doc.text
        assert sample["json"] == {"source": doc.source, "bytes": len(doc.text.encode())}


def test_eval_split_is_nonempty_and_disjoint(prepared: Manifest) -> None:
    train, evaluation = read_split(prepared, "train"), read_split(prepared, "eval")
    assert evaluation and not set(train) & set(evaluation)
    assert prepared.stats["eval_documents"] == len(evaluation)


def test_unigram_entropy_is_that_of_train_tokens(prepared: Manifest) -> None:
    counts = Counter()
    for sample in read_split(prepared, "train").values():
        counts.update(sample["tokens"].tolist())
    p = np.array(list(counts.values()), dtype=float) / sum(counts.values())
    assert prepared.stats["unigram_entropy"] == pytest.approx(
        float(-(p * np.log(p)).sum()), rel=1e-9
    )
    assert unigram_entropy(np.array([5, 5, 0])) == pytest.approx(np.log(2))


def hashes(manifest: Manifest) -> list[tuple[str, str]]:
    return [(s.name, s.sha256) for split in manifest.splits.values() for s in split]


def test_same_inputs_give_identical_shards_whatever_the_workers(
    prepared: Manifest, corpus_dir: Path, tokenizer_model: Path, tmp_path: Path
) -> None:
    again = prepare(
        str(corpus_dir),
        tmp_path / "again",
        tokenizer=str(tokenizer_model),
        eval_fraction=0.05,
        shard_tokens=20_000,
        workers=1,
        progress=False,
    )
    assert hashes(again) == hashes(prepared)
    other_seed = prepare(
        str(corpus_dir),
        tmp_path / "seed1",
        tokenizer=str(tokenizer_model),
        eval_fraction=0.05,
        shard_tokens=20_000,
        seed=1,
        workers=2,
        progress=False,
    )
    assert hashes(other_seed) != hashes(prepared)


def test_tiny_corpus_still_gets_an_eval_document(tmp_path: Path, tokenizer_model: Path) -> None:
    src = tmp_path / "two.jsonl"
    src.write_text('{"text": "first document"}\n{"text": "second document"}\n')
    manifest = prepare(
        str(src),
        tmp_path / "out",
        tokenizer=str(tokenizer_model),
        eval_fraction=1e-9,
        progress=False,
    )
    assert manifest.stats["eval_documents"] == 1 and manifest.stats["train_documents"] == 1


def test_missing_source_raises_data_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = str(tmp_path / "nowhere" / "*.txt")
    with pytest.raises(DataError, match="nowhere"):
        prepare(missing, tmp_path / "out", progress=False)
    assert main(["--source", missing, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nowhere" in err[0]


def test_cli_prints_a_summary(
    tmp_path: Path, corpus_dir: Path, tokenizer_model: Path, capsys
) -> None:
    src = str(corpus_dir / "extra" / "docs.jsonl")
    argv = [
        "--source",
        src,
        "--out",
        str(tmp_path / "o"),
        "--tokenizer",
        str(tokenizer_model),
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "4 docs" in out and "tokens/s" in out and "unigram entropy" in out
    assert Manifest.load(tmp_path / "o" / "manifest.json").stats["documents"] == 4


def test_manifest_load_errors_are_helpful(tmp_path: Path, prepared: Manifest) -> None:
    with pytest.raises(
        DataError, match=r"is not a prepared corpus: no manifest.json \(run megatrain-prepare"
    ):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="malformed"):
        Manifest.load(tmp_path)
    broken = Manifest.load(prepared.root)
    broken.root = tmp_path
    broken.splits = {
        k: [s.__class__(s.name, tmp_path / s.name, s.samples, s.tokens, s.sha256) for s in v]
        for k, v in broken.splits.items()
    }
    with pytest.raises(DataError, match="train-000000.tar"):
        broken.check_files()
    prepared.check_files()


def test_sources_keys_and_chunks(corpus_dir: Path, shakespeare_text: str) -> None:
    docs = list(iter_documents(str(corpus_dir)))
    keys = [d.key for d in docs]
    assert len(set(keys)) == len(keys) and not any("." in k or "/" in k for k in keys)
    assert keys == [d.key for d in iter_documents(str(corpus_dir))]
    shakespeare = [d.text for d in docs if d.source == "shakespeare.txt"]
    assert "".join(shakespeare) == shakespeare_text and len(shakespeare) > 50
    assert max(map(len, shakespeare)) <= 4096
    assert "".join(chunk_text("x" * 10_000 + "\n\ny", 4096)) == "x" * 10_000 + "\n\ny"


def test_stdlib_source_excludes_third_party_packages() -> None:
    files = resolve_files("stdlib")
    labels = [label for _, label in files]
    assert len(files) > 500 and labels == sorted(labels)
    assert "stdlib/json/decoder.py" in labels
    assert not any("site-packages" in label or "dist-packages" in label for label in labels)
    first = next(iter_documents("stdlib"))
    assert "." not in first.key and first.key.startswith("stdlib-")


def test_bad_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        list(iter_documents(str(bad)))


def _ensure_and_stat(args: tuple[str, str]) -> int:
    folder = ensure_prepared(args[0], Path(args[1]), 512, workers=1, progress=False)
    return (folder / "manifest.json").stat().st_mtime_ns


def test_ensure_prepared_prepares_once_under_concurrency(
    tmp_path: Path, shakespeare_text: str
) -> None:
    src = tmp_path / "small.txt"
    src.write_text(shakespeare_text[:40_000])
    cache = tmp_path / "cache"
    with mp.get_context("fork").Pool(2) as pool:  # two "ranks" racing for the same cache
        mtimes = pool.map(_ensure_and_stat, [(str(src), str(cache))] * 2)
    assert mtimes[0] == mtimes[1]  # the second waited for the lock, then reused the corpus
    folder = ensure_prepared(str(src), cache, 512, workers=1, progress=False)
    assert (folder / "manifest.json").stat().st_mtime_ns == mtimes[0]
    assert folder.name.endswith("-v512-tok2") and Manifest.load(folder).source == str(src)
    (folder / "train-000000.tar").unlink()  # an incomplete cache is prepared again
    ensure_prepared(str(src), cache, 512, workers=1, progress=False)
    Manifest.load(folder).check_files()


# --- shard bytes, cleaning, resume, verify -----------------------------------------------------


def test_tar_members_have_fixed_metadata(prepared: Manifest) -> None:
    import tarfile

    with tarfile.open(prepared.splits["train"][0].path) as tar:
        members = tar.getmembers()
    assert members and all(
        (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o444)
        for m in members
    )
    assert [m.name.split(".", 1)[1] for m in members[:2]] == ["json", "tokens.npy"]
    assert all(s.nbytes == s.path.stat().st_size for s in prepared.splits["train"])


def test_shard_bytes_rolls_over_by_size(
    tmp_path: Path, corpus_dir: Path, tokenizer_model: Path
) -> None:
    manifest = prepare(str(corpus_dir), tmp_path / "o", tokenizer=str(tokenizer_model),
                       shard_bytes=60_000, workers=1, progress=False)
    sizes = [s.nbytes for s in manifest.splits["train"]]
    assert len(sizes) >= 5
    # a shard closes at the first sample that takes it to 60 KB: at most one ~4 KB doc past it
    assert all(60_000 <= n < 60_000 + 30_000 for n in sizes[:-1])
    assert manifest.options["shard_bytes"] == 60_000
    with pytest.raises(ConfigError, match="not both"):
        prepare(str(corpus_dir), tmp_path / "x", shard_bytes=1, shard_tokens=1, progress=False)


CLEAN_DOCS = [
    "caf\u00e9 au lait, twice\n",  # NFC
    "cafe\u0301 au lait, twice\n",  # NFD: the same text once normalized -> a duplicate
    "ﬁne ligature and ＦＵＬＬ width\n",  # NFKC: "fine ligature and FULL width"
    "short\n",
    "     tiny     \n",  # 4 characters once trimmed
    "a long enough document\n",
    "a long enough document\n",  # exact duplicate
]


def test_cleaning_normalizes_filters_and_counts(
    tmp_path: Path, tokenizer_model: Path, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in CLEAN_DOCS), encoding="utf-8")
    argv = ["--source", str(src), "--out", str(tmp_path / "o"), "--tokenizer",
            str(tokenizer_model), "--normalize", "NFKC", "--min-chars", "10", "--dedup",
            "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "read 7 documents; dropped 2 short, 2 duplicate" in captured.err
    assert "read 7 docs, dropped 2 short, 2 duplicate" in captured.out
    manifest = Manifest.load(tmp_path / "o")
    stats = manifest.stats
    assert (stats["documents_read"], stats["dropped_short"], stats["dropped_duplicate"]) == (7, 2, 2)
    assert stats["documents"] == 3
    assert manifest.options["clean"] == {"normalize": "NFKC", "min_chars": 10, "dedup": True}
    tok = load_tokenizer(manifest.tokenizer_path)
    texts = {tok.decode(s["tokens"].tolist())
             for split in ("train", "eval") for s in read_split(manifest, split).values()}
    assert texts == {"caf\u00e9 au lait, twice\n", "fine ligature and FULL width\n",
                     "a long enough document\n"}


def test_without_cleaning_nothing_is_dropped(prepared: Manifest) -> None:
    stats = prepared.stats
    assert stats["dropped_short"] == stats["dropped_duplicate"] == stats["dropped_empty"] == 0
    assert stats["documents_read"] == stats["documents"]


def _mtimes(manifest: Manifest) -> dict[str, int]:
    return {s.name: s.path.stat().st_mtime_ns for v in manifest.splits.values() for s in v}


def test_rerun_keeps_intact_shards_and_rewrites_damaged_ones(
    prepared: Manifest, corpus_dir: Path, tokenizer_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    kwargs = {"tokenizer": str(tokenizer_model), "eval_fraction": 0.05, "shard_tokens": 20_000,
                  "progress": False}
    first = prepare(str(corpus_dir), out, workers=2, **kwargs)
    before = _mtimes(first)
    damaged = first.splits["train"][2].path
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (out / "train-000099.tar").write_bytes(b"stale")  # not listed anywhere: removed
    again = prepare(str(corpus_dir), out, workers=1, **kwargs)
    assert hashes(again) == hashes(prepared)
    assert again.stats == prepared.stats
    after = _mtimes(again)
    kept = [n for n in before if after[n] == before[n]]
    evals = {s.name for s in first.splits["eval"]}
    assert set(kept) == {"train-000000.tar", "train-000001.tar"} | evals  # the intact prefixes
    assert not (out / "train-000099.tar").exists()
    other = prepare(str(corpus_dir), out, workers=1, **(kwargs | {"eval_fraction": 0.2}))
    assert hashes(other) != hashes(prepared)  # other options: started over, nothing reused


def test_verify_reports_each_bad_shard(
    prepared: Manifest, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(prepared.root, folder)
    assert main(["--verify", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.count("\nok ") + out.startswith("ok ") == 1 + sum(map(len, prepared.splits.values()))
    shards = prepared.splits["train"]
    flipped = folder / shards[1].name
    data = bytearray(flipped.read_bytes())
    data[2000] ^= 0x01  # one bit of a token id of the first sample (its ids start at 1664)
    flipped.write_bytes(bytes(data))
    (folder / shards[3].name).unlink()
    with open(folder / shards[4].name, "r+b") as f:
        f.truncate(shards[4].nbytes // 2)
    assert main(["--verify", str(folder)]) == 2
    captured = capsys.readouterr()
    bad = [line for line in captured.out.splitlines() if line.startswith("BAD")]
    assert [line.split()[2] for line in bad] == [shards[i].name for i in (1, 3, 4)]
    assert "sha256 differs" in bad[0] and "missing" in bad[1] and "size" in bad[2]
    assert captured.err.startswith("error: ") and shards[3].name in captured.err


def test_prepare_trains_a_char_model_that_round_trips(tmp_path: Path, corpus_dir: Path) -> None:
    manifest = prepare(str(corpus_dir), tmp_path / "o", vocab_size=512, tokenizer_type="char",
                       tokenizer_sample=2_000, workers=1, progress=False)
    assert manifest.options["tokenizer_type"] == "char"
    assert manifest.options["tokenizer_sample"] == 2_000
    tok = load_tokenizer(manifest.tokenizer_path)
    docs = {d.key: d.text for d in iter_documents(str(corpus_dir))}
    samples = read_split(manifest, "train") | read_split(manifest, "eval")
    assert len(samples) == len(docs)
    for key, sample in samples.items():
        assert tok.decode(sample["tokens"].tolist()) == docs[key]
        assert len(sample["tokens"]) >= len(docs[key])  # one token per character at least


def test_prepare_with_a_tokenizer_json_gives_the_same_tokens(
    prepared: Manifest, corpus_dir: Path, tokenizer_model: Path, tmp_path: Path
) -> None:
    pytest.importorskip("transformers")
    from megatrain.data.tokenizer.convert_to_hf import save_hf_tokenizer
    from megatrain.data.tokenizer.hf_tokenizer import HFTokenizer

    (tmp_path / "hf").mkdir()
    save_hf_tokenizer(tokenizer_model, tmp_path / "hf")
    manifest = prepare(str(corpus_dir), tmp_path / "o",
                       tokenizer=str(tmp_path / "hf" / "tokenizer.json"), eval_fraction=0.05,
                       shard_tokens=20_000, workers=2, progress=False)
    assert manifest.tokenizer_path.name == "tokenizer.json"
    assert (tmp_path / "o" / "tokenizer_config.json").is_file()
    assert isinstance(load_tokenizer(manifest.tokenizer_path), HFTokenizer)
    assert manifest.eos_id == prepared.eos_id
    ours, theirs = read_split(prepared, "train"), read_split(manifest, "train")
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k]["tokens"], theirs[k]["tokens"]) for k in ours)


def test_the_output_folders_own_tokenizer_can_be_given(
    tmp_path: Path, corpus_dir: Path, tokenizer_model: Path
) -> None:
    out = tmp_path / "o"
    first = prepare(str(corpus_dir), out, tokenizer=str(tokenizer_model), progress=False)
    again = prepare(str(corpus_dir), out, tokenizer=str(out / "tokenizer.model"), eval_fraction=0.1,
                    progress=False)  # other options: a fresh start that must keep the tokenizer
    assert again.tokenizer["sha256"] == first.tokenizer["sha256"]
    assert again.stats["eval_documents"] > first.stats["eval_documents"]


def test_a_torn_journal_line_is_ignored(
    prepared: Manifest, corpus_dir: Path, tokenizer_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    kwargs = {"tokenizer": str(tokenizer_model), "eval_fraction": 0.05, "shard_tokens": 20_000,
              "workers": 1, "progress": False}
    first = prepare(str(corpus_dir), out, **kwargs)
    before = _mtimes(first)
    journal = out / "prepare-journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:-3]) + lines[-3][: len(lines[-3]) // 2])  # killed mid-append
    again = prepare(str(corpus_dir), out, **kwargs)
    assert hashes(again) == hashes(prepared)
    after = _mtimes(again)
    assert sum(after[n] == before[n] for n in before) == len(before) - 3  # only those redone
