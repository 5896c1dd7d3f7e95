"""Tiny synthetic prepared corpora for stream tests: real tar shards and a real manifest.

Document ``k`` of a corpus holds tokens ``base + k`` repeated (so any token tells which document
it came from) and is keyed ``<prefix>-<k>``; EOS is 2, pad 3. With ``distinct`` every token of
the corpus is its own id instead (``base`` on, document after document): a row of tokens tells
where in the corpus it came from.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megatrain.data.manifest import Manifest, ShardInfo, sha256_file

EOS, PAD = 2, 3


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_tar(path: Path, samples: Sequence[tuple[str, bytes]]) -> None:
    """A shard of ``(key, tokens.npy bytes)`` samples, each with a small ``.json`` member."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, data in samples:
            for name, body in ((f"{key}.json", b"{}"), (f"{key}.tokens.npy", data)):
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))


def doc_tokens(k: int, length: int, base: int = 10) -> np.ndarray:
    return np.full(length, base + k, dtype=np.uint16)


def make_corpus(root: Path, lengths: Sequence[int], *, shards: int = 4, prefix: str = "d",
                base: int = 10, vocab: int = 4096, distinct: bool = False) -> Manifest:
    """A prepared corpus of ``len(lengths)`` documents over ``shards`` train shards."""
    root.mkdir(parents=True, exist_ok=True)
    starts = base + np.concatenate([[0], np.cumsum(lengths)])
    (root / "tokenizer.model").write_bytes(b"fake")
    infos = []
    for s, part in enumerate(np.array_split(np.arange(len(lengths)), shards)):
        path = root / f"train-{s:06d}.tar"
        write_tar(path, [(f"{prefix}-{k}", npy(
            np.arange(starts[k], starts[k + 1], dtype=np.uint16) if distinct
            else doc_tokens(k, lengths[k], base))) for k in part])
        infos.append(ShardInfo(path.name, str(path), len(part), int(sum(lengths[k] for k in part)),
                               sha256_file(path), path.stat().st_size))
    manifest = Manifest(root, "synthetic", 0, {"file": "tokenizer.model", "sha256": "fake",
                                              "vocab_size": vocab, "eos_id": EOS, "pad_id": PAD},
                        {"train": infos, "eval": []})
    manifest.save()
    return manifest


def all_keys(manifest: Manifest, prefix: str = "d") -> set[str]:
    return {f"{prefix}-{k}" for k in range(sum(s.samples for s in manifest.shards("train")))}
