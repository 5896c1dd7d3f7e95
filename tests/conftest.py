"""Shared fixtures: a small real corpus (a slice of tinyshakespeare + a JSONL file), prepared once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
SLICE_CHARS = 300_000

JSONL_DOCS = [
    {"text": "def greet(name):\n    return f'hello {name}'\n"},
    {"text": ""},  # empty: skipped by prepare
    {"text": "Tabs\tand  double  spaces\n\n\nand blank lines.\n", "lang": "en"},
    {"text": "naïve café — 東京 🐍\n"},
    {"text": "class A:\n\tdef f(self):\n\t\treturn 1\n"},
]


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """The first ~300 KB of tinyshakespeare (never copied into the repo)."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"shared test data not found at {SHAKESPEARE}")
    return SHAKESPEARE.read_text(encoding="utf-8")[:SLICE_CHARS]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    """A source folder: ``shakespeare.txt`` (a slice) and ``extra/docs.jsonl``."""
    root = tmp_path_factory.mktemp("raw")
    (root / "shakespeare.txt").write_text(shakespeare_text, encoding="utf-8")
    (root / "extra").mkdir()
    lines = [json.dumps(doc, ensure_ascii=False) for doc in JSONL_DOCS]
    (root / "extra" / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "notes.md").write_text("not a corpus file: ignored")
    return root


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    """A 512-piece tokenizer trained on the small corpus."""
    from megatrain.data.prepare.sources import iter_documents
    from megatrain.data.prepare.train_tokenizer import train_tokenizer

    texts = (doc.text for doc in iter_documents(str(corpus_dir)))
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer.model", 512)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, tokenizer_model: Path):
    """The small corpus prepared into several ~20k-token shards, with a 5% eval split."""
    from megatrain.data.prepare.pipeline import prepare

    out = tmp_path_factory.mktemp("prepared")
    return prepare(
        str(corpus_dir),
        out,
        tokenizer=str(tokenizer_model),
        eval_fraction=0.05,
        shard_tokens=20_000,
        workers=2,
        progress=False,
    )


@pytest.fixture(scope="session")
def http_corpus(prepared):
    """The prepared corpus served by a local HTTP server (range requests): (server, its URL)."""
    from tests.servers import http_server

    server = http_server(Path(prepared.root).parent).start()
    yield server, f"http://127.0.0.1:{server.port}/{Path(prepared.root).name}"
    server.stop()


@pytest.fixture(scope="session")
def s3_corpus(prepared):
    """The prepared corpus in a bucket of a local S3 server (moto): (server, its s3:// URL).
    This process's environment points at the server while the session lasts."""
    from tests.servers import s3_environment, s3_server, upload_folder

    server = s3_server().start()
    url = "s3://corpora/small"
    with s3_environment(server.port):
        upload_folder(Path(prepared.root), url)
        yield server, url
    server.stop()
