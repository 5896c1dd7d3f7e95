"""Sources: every input format gives the same documents, read as a stream; bad input is named."""

from __future__ import annotations

import gzip
import json
import re
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from megatrain.data.prepare.sources import (
    TXT_CHUNK_CHARS,
    chunk_text,
    iter_documents,
    resolve_files,
    window_cut,
)
from megatrain.errors import DataError
from tests.conftest import SHAKESPEARE

RECORDS = [
    {"content": "def f(x):\n    return x\n", "id": 1},
    {"content": "naïve café — 東京 🐍\n", "id": 2},
    {"content": "   \n", "id": 3},  # blank: skipped
    {"content": "x" * 70_000, "id": 4},  # longer than 64K characters: chunked
    {"content": "last\tone\n", "id": 5},
]
EXPECTED = ["def f(x):\n    return x\n", "naïve café — 東京 🐍\n", "x" * 65536, "x" * 4464,
            "last\tone\n"]


@pytest.fixture(scope="module")
def shakespeare_full() -> str:
    """All of tinyshakespeare (1.1M characters: more than one read window)."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"shared test data not found at {SHAKESPEARE}")
    return SHAKESPEARE.read_text(encoding="utf-8")


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def write_all_formats(folder: Path, records: list[dict]) -> dict[str, Path]:
    """The same records as .jsonl, .jsonl.gz, .jsonl.zst (two frames) and .parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    data = jsonl_bytes(records)
    paths = {kind: folder / f"docs{kind}" for kind in
             (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")}
    paths[".jsonl"].write_bytes(data)
    paths[".jsonl.gz"].write_bytes(gzip.compress(data))
    half = len(data) // 2
    zstd = zstandard.ZstdCompressor()
    paths[".jsonl.zst"].write_bytes(zstd.compress(data[:half]) + zstd.compress(data[half:]))
    table = pa.table({"id": [r["id"] for r in records], "content": [r["content"] for r in records]})
    pq.write_table(table, paths[".parquet"], row_group_size=2)
    return paths


@pytest.mark.parametrize("kind", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"])
def test_every_format_gives_the_same_documents(tmp_path: Path, kind: str) -> None:
    path = write_all_formats(tmp_path, RECORDS)[kind]
    docs = list(iter_documents(str(path), text_field="content"))
    assert [d.text for d in docs] == EXPECTED
    assert all(d.source == path.name for d in docs)
    assert len({d.key for d in docs}) == len(docs) and not any("." in d.key for d in docs)


def test_a_folder_mixes_formats_in_sorted_order(tmp_path: Path) -> None:
    write_all_formats(tmp_path / "a", RECORDS[:2])
    (tmp_path / "b.txt").write_text("plain text\n")
    (tmp_path / "notes.md").write_text("ignored")
    labels = [label for _, label in resolve_files(str(tmp_path))]
    assert labels == ["a/docs.jsonl", "a/docs.jsonl.gz", "a/docs.jsonl.zst", "a/docs.parquet",
                      "b.txt"]
    texts = [d.text for d in iter_documents(str(tmp_path), text_field="content")]
    assert texts == EXPECTED[:2] * 4 + ["plain text\n"]
    assert [label for _, label in resolve_files(str(tmp_path / "a" / "*.jsonl.*"))] == [
        "docs.jsonl.gz", "docs.jsonl.zst"]


def test_a_long_text_file_is_read_in_windows_and_round_trips(shakespeare_full: str,
                                                             tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text(shakespeare_full * 3, encoding="utf-8")  # 3.3M characters: several windows
    docs = [d.text for d in iter_documents(str(path))]
    assert "".join(docs) == shakespeare_full * 3
    assert max(map(len, docs)) <= TXT_CHUNK_CHARS and len(docs) > 800


def test_reading_does_not_hold_the_corpus_in_memory(tmp_path: Path) -> None:
    """A 24 MB text file and a 24 MB Parquet file stream with a few MB of memory."""
    line = "lorem ipsum dolor sit amet " * 10 + "\n"
    text = tmp_path / "big.txt"
    with text.open("w") as f:
        for i in range(90_000):
            f.write(line if i % 7 else "\n")
    rows = [line * 4] * 24_000
    parquet = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": rows}), parquet, row_group_size=1000)
    del rows
    tracemalloc.start()
    docs = sum(1 for _ in iter_documents(str(text)))
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    arrow_peak, count = 0, 0
    for _ in iter_documents(str(parquet)):
        count += 1
        arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
    assert docs > 1000 and count == 24_000
    assert python_peak < 12e6, python_peak  # the file is 24 MB; a window is ~2 MB of text
    assert arrow_peak < 4e6, arrow_peak  # one record batch, not the 26 MB column


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"body": "no text field"}\n', r"bad.jsonl:2: .*'text'"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": 3}\n', r"bad.jsonl:2: 'text' must be a string"),
        ("bad.jsonl.zst", None, r"bad.jsonl.zst:4: expected a JSON object"),
        ("cut.jsonl.gz", None, r"cut.jsonl.gz: unreadable after line"),
        ("junk.jsonl.zst", b"not zstd at all", r"junk.jsonl.zst: unreadable"),
        ("junk.parquet", b"not parquet", r"junk.parquet: not a readable Parquet file"),
    ],
)
def test_bad_input_names_file_and_line(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if name == "bad.jsonl.zst":
        content = zstandard.ZstdCompressor().compress(b'{"text": "a"}\n\n{"text": "b"}\n{oops\n')
    if name == "cut.jsonl.gz":
        content = gzip.compress(jsonl_bytes([{"text": "y" * 1000}] * 200))[:-200]
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(iter_documents(str(path)))


def test_bad_parquet_columns_are_named(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["a", "b"], "n": [1, 2]}), path)
    with pytest.raises(DataError, match=r"t.parquet: no column 'text' \(columns: body, n\)"):
        list(iter_documents(str(path)))
    with pytest.raises(DataError, match=r"column 'n' holds int64, not strings"):
        list(iter_documents(str(path), text_field="n"))
    pq.write_table(pa.table({"text": ["a", "b", None]}), path, row_group_size=1)
    with pytest.raises(DataError, match=r"t.parquet: row 2 \(0-based\): 'text' is null"):
        list(iter_documents(str(path)))


def test_lone_surrogates_in_json_become_replacement_characters(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a\\ud800b \\ud83d\\udc0d"}\n')
    (doc,) = iter_documents(str(path))
    assert doc.text == "a\ufffdb 🐍"
    doc.text.encode("utf-8")  # would raise for a lone surrogate


PARAGRAPH = re.compile(r"(?<=\n\n)(?!\n)")


@given(st.text(alphabet="ab\n", max_size=60), st.text(alphabet="ab\n", max_size=20))
@settings(max_examples=300, deadline=None)
def test_window_cuts_are_paragraph_or_line_breaks_whatever_follows(head: str, tail: str) -> None:
    cut = window_cut(head, limit=1000)
    if cut < 0:
        assert "\n" not in head.rstrip("\n")
        return
    whole = head + tail
    assert 0 < cut < len(head) and head[cut - 1] == "\n" and head[cut] != "\n"
    breaks = {m.start() for m in PARAGRAPH.finditer(whole)}
    if "\n\n" in head.rstrip("\n"):
        assert cut in breaks  # a paragraph break of the whole text, whatever the tail is
    parts = [whole[:cut], whole[cut:]]
    chunks = chunk_text(parts[0], 16) + chunk_text(parts[1], 16)
    assert "".join(chunks) == "".join(p for p in parts if p.strip())


def test_a_huge_single_line_is_cut_at_the_limit() -> None:
    assert window_cut("x" * 50, limit=100) == -1
    assert window_cut("x" * 150, limit=100) == 150
