"""``megatrain-prepare``: raw corpus → tokenizer + tokenized WebDataset shards + manifest.json."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatrain.errors import EXIT_OK, MegatrainError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatrain-prepare",
        description="Tokenize a corpus into WebDataset shards with a manifest.json.",
    )
    parser.add_argument(
        "--source", required=True, help="a .txt/.jsonl file, glob or folder, or 'stdlib'"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--tokenizer", help="an existing SentencePiece model to use")
    vocab.add_argument(
        "--vocab-size", type=int, default=8192, help="train a tokenizer of this size"
    )
    parser.add_argument("--eval-fraction", type=float, default=0.01)
    parser.add_argument("--shard-tokens", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; a MegatrainError becomes one ``error:`` line and its exit code."""
    args = build_parser().parse_args(argv)
    from megatrain.data.prepare import prepare  # deferred: --help stays fast

    start = time.perf_counter()
    try:
        manifest = prepare(
            args.source,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            eval_fraction=args.eval_fraction,
            shard_tokens=args.shard_tokens,
            workers=args.workers,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except MegatrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    seconds = time.perf_counter() - start
    stats = manifest.stats
    tokens = stats["train_tokens"] + stats["eval_tokens"]
    shards = {split: len(manifest.splits[split]) for split in ("train", "eval")}
    print(
        f"prepared {args.out}: {stats['documents']} docs, {tokens:,} tokens "
        f"(train {stats['train_tokens']:,}, eval {stats['eval_tokens']:,}), "
        f"shards train={shards['train']} eval={shards['eval']}, vocab {manifest.vocab_size}, "
        f"{tokens / seconds:,.0f} tokens/s in {seconds:.1f}s, "
        f"unigram entropy {stats['unigram_entropy']:.3f} nats/token"
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
