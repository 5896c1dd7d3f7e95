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

from megatrain.data.manifest import Manifest, sha256_file
from megatrain.data.prepare import ensure_prepared, prepare, unigram_entropy
from megatrain.data.sources import chunk_text, iter_documents, resolve_files
from megatrain.data.tokenizer import Tokenizer
from megatrain.errors import DataError
from megatrain.prepare import main


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
    tok = Tokenizer.load(prepared.tokenizer_path)
    docs = [d for d in iter_documents(str(corpus_dir)) if d.text]
    assert sorted(samples) == sorted(d.key for d in docs)  # the empty JSONL record is skipped
    assert prepared.stats["documents"] == len(docs)
    for doc in docs:
        sample = samples[doc.key]
        assert tok.decode(sample["tokens"].tolist()) == doc.text
        assert sample["meta"] == {"source": doc.source, "bytes": len(doc.text.encode())}
        assert tok.eos_id not in sample["tokens"]  # the packer adds EOS, not the shards


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
