"""Re-splitting saved reader positions over a different number of readers.

A reader's position in one source is a queue of pieces ``[epoch, a, b, off]`` (global sample
indices ``a..b-1`` of that epoch, the first one already ``off`` tokens in), followed by every
epoch from ``next`` on, read as this reader's normal share under its layout. To move to another
number of readers, the remaining work of every old reader is pooled per epoch: its queued
pieces, plus its whole old share of each epoch it has not started while another reader has.
Each pooled epoch is cut into equal contiguous parts, one per new reader; epochs that no old
reader has started are left to the new layout's normal split. So every sample of every epoch is
still read exactly once, and a half-read document continues from its token offset.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

Piece = tuple[int, int, int]  # (a, b, off)


def share(total: int, reader: int, num_readers: int) -> tuple[int, int]:
    """Reader ``reader``'s contiguous slice ``[lo, hi)`` of ``total`` global indices."""
    return reader * total // num_readers, (reader + 1) * total // num_readers


def split_pieces(pieces: Sequence[Piece], parts: int) -> list[list[Piece]]:
    """Cut sorted pieces into ``parts`` runs of (nearly) equal sample counts, in order."""
    total = sum(b - a for a, b, _ in pieces)
    bounds = [j * total // parts for j in range(parts + 1)]
    out: list[list[Piece]] = [[] for _ in range(parts)]
    done, j = 0, 0
    for a, b, off in pieces:
        while a < b:
            while done >= bounds[j + 1]:
                j += 1
            take = min(b - a, bounds[j + 1] - done)
            out[j].append((a, a + take, off))
            a, off, done = a + take, 0, done + take
    return out


def merge_source(old: Sequence[dict[str, Any]], *, samples: int, new_readers: int,
                 epochs: int | None) -> list[dict[str, Any]]:
    """One source's ``{"todo", "next"}`` for each of ``new_readers``, from every old reader's."""
    nxt = max(int(s["next"]) for s in old)
    pooled: dict[int, list[Piece]] = defaultdict(list)
    for reader, state in enumerate(old):
        for e, a, b, off in state["todo"]:
            pooled[int(e)].append((int(a), int(b), int(off)))
        lo, hi = share(samples, reader, len(old))
        for e in range(int(state["next"]), nxt):
            if hi > lo:
                pooled[e].append((lo, hi, 0))
    new = [{"todo": [], "next": nxt} for _ in range(new_readers)]
    for e in sorted(pooled):
        if epochs is not None and e >= epochs:
            continue
        for j, parts in enumerate(split_pieces(sorted(pooled[e]), new_readers)):
            new[j]["todo"] += [[e, a, b, off] for a, b, off in parts]
    return new


def merge_readers(old: Sequence[dict[str, Any]], *, samples: Sequence[int], new_readers: int,
                  epochs: Sequence[int | None]) -> list[dict[str, Any]]:
    """Reader states for ``new_readers`` readers from all old readers' states (rank-major)."""
    per_source = [
        merge_source([r["sources"][s] for r in old], samples=n, new_readers=new_readers,
                     epochs=epochs[s])
        for s, n in enumerate(samples)
    ]
    counts = [sum(int(r["counts"][s]) for r in old) // new_readers for s in range(len(samples))]
    return [{"sources": [per_source[s][j] for s in range(len(samples))], "counts": list(counts)}
            for j in range(new_readers)]
