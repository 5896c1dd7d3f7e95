"""Document cleaning before tokenization: Unicode normalization, a minimum length, exact dedup.

Cleaning runs in the main process, in document order, because exact-duplicate removal keeps the
*first* copy of a text and so needs one ordered view of the corpus. Each step is C-speed
(``unicodedata``, ``blake2b``), far cheaper than tokenizing the same text. It applies to each
document as written: a JSONL record or Parquet row, a code file, or one ~4 KB group of paragraphs
of a ``.txt`` file (records over 64K characters are chunked first).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

from megatrain.data.prepare.sources import Document
from megatrain.errors import ConfigError

NORMALIZE_FORMS = ("none", "NFC", "NFKC")


@dataclass(frozen=True)
class CleanOptions:
    """``normalize``: a Unicode normal form or "none"; ``min_chars``: drop documents shorter
    than this once leading and trailing whitespace is stripped; ``dedup``: drop exact repeats of
    an earlier document (compared after normalization)."""

    normalize: str = "none"
    min_chars: int = 0
    dedup: bool = False

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE_FORMS:
            raise ConfigError(
                f"normalize must be one of {', '.join(NORMALIZE_FORMS)}, got {self.normalize!r}"
            )
        if self.min_chars < 0:
            raise ConfigError(f"min_chars must be >= 0, got {self.min_chars}")

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class Cleaner:
    """Applies :class:`CleanOptions` to a document stream and counts what it read and dropped.

    Dedup memory is 16 bytes of digest (plus set overhead, ~90 bytes in all) per kept document.
    """

    def __init__(self, options: CleanOptions) -> None:
        self.options = options
        self.read = self.dropped_short = self.dropped_duplicate = 0
        self._seen: set[bytes] = set()

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        """The kept documents, normalized, in order."""
        for doc in docs:
            self.read += 1
            text = self._normalized(doc.text)
            if self._too_short(text):
                self.dropped_short += 1
            elif self.options.dedup and self._seen_before(text):
                self.dropped_duplicate += 1
            else:
                yield doc if text is doc.text else doc._replace(text=text)

    def stats(self) -> dict[str, int]:
        """The counts that go into the manifest's stats and the log."""
        return {
            "documents_read": self.read,
            "dropped_short": self.dropped_short,
            "dropped_duplicate": self.dropped_duplicate,
        }

    def _normalized(self, text: str) -> str:
        form = self.options.normalize
        if form == "none" or unicodedata.is_normalized(form, text):
            return text
        return unicodedata.normalize(form, text)

    def _too_short(self, text: str) -> bool:
        limit = self.options.min_chars
        return limit > 0 and (len(text) < limit or len(text.strip()) < limit)

    def _seen_before(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False
