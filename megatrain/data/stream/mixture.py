"""Weighted mixtures of prepared sources (``data.mixture``).

Each reader interleaves its sources document by document: the next document comes from the
active source whose realized token share lies furthest below its weight. The choice depends on
the token counts only, so it is deterministic and replays exactly from a saved state, and the
realized shares stay within one document of the weights. A source with an ``epochs`` limit drops
out once it has served that many epochs; the others' weights are renormalized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatrain.data.manifest import Manifest, ShardInfo
from megatrain.errors import ConfigError


@dataclass(frozen=True)
class Source:
    """One corpus in the stream: its shards, its weight and an optional epochs limit."""

    name: str
    shards: tuple[ShardInfo, ...]
    weight: float = 1.0
    epochs: int | None = None

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


def choose(counts: Sequence[int], weights: Sequence[float], active: Sequence[bool]) -> int | None:
    """The active source furthest below its (renormalized) weight; ties go to the lowest index."""
    total_weight = sum(w for w, a in zip(weights, active, strict=True) if a)
    if total_weight <= 0:
        return None
    total = sum(c for c, a in zip(counts, active, strict=True) if a)
    best, best_deficit = None, 0.0
    for i, (count, weight, on) in enumerate(zip(counts, weights, active, strict=True)):
        if not on:
            continue
        deficit = weight / total_weight * total - count
        if best is None or deficit > best_deficit:
            best, best_deficit = i, deficit
    return best


@dataclass(frozen=True)
class MixtureEntry:
    """A parsed ``data.mixture`` item: what to load (a prepared folder or ``stdlib``), its label
    in metrics and traces, weight and epochs limit."""

    path: str
    name: str
    weight: float
    epochs: int | None


def parse_mixture(items: Sequence[Any]) -> list[MixtureEntry]:
    """``[{path|name, weight, epochs?}, ...]`` → entries; ConfigError naming what is wrong."""
    entries = []
    for i, item in enumerate(items):
        item = dict(item)
        unknown = set(item) - {"path", "name", "weight", "epochs"}
        path = item.get("path") or item.get("name")
        if unknown or not path:
            raise ConfigError(f"data.mixture[{i}] needs path (or name), weight and optionally "
                              f"epochs; got {sorted(item)}")
        weight = float(item.get("weight", 1.0))
        epochs = item.get("epochs")
        if weight <= 0 or (epochs is not None and int(epochs) < 1):
            raise ConfigError(f"data.mixture[{i}]: weight must be > 0 and epochs >= 1, got "
                              f"weight={weight}, epochs={epochs}")
        name = str(item.get("name") or Path(str(path)).name)
        entries.append(MixtureEntry(str(path), name, weight, None if epochs is None else int(epochs)))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.mixture names must be unique (set name:), got {names}")
    return entries


def build_sources(entries: Sequence[MixtureEntry], load: Callable[[str], Manifest],
                  split: str = "train") -> tuple[list[Source], list[Manifest]]:
    """Load each entry's corpus; ConfigError unless they all share one tokenizer."""
    manifests = [load(e.path) for e in entries]
    hashes = {m.tokenizer.get("sha256", m.tokenizer.get("file")) for m in manifests}
    if len(hashes) > 1:
        raise ConfigError("data.mixture sources were prepared with different tokenizers: "
                          + ", ".join(f"{e.name}={m.tokenizer.get('sha256', '?')[:12]}"
                                      for e, m in zip(entries, manifests, strict=True))
                          + "; prepare them with the same --tokenizer")
    sources = [Source(e.name, tuple(m.shards(split)), e.weight, e.epochs)
               for e, m in zip(entries, manifests, strict=True)]
    return sources, manifests
