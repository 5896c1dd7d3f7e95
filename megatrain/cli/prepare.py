"""``megatrain-prepare``: raw corpus → tokenizer + tokenized WebDataset shards + manifest.json.

``--format sft|cls|seq2seq`` prepares task data for fine-tuning instead (docs/data.md, "Task
data").

``megatrain-prepare --verify DIR|URL`` checks a prepared corpus against its manifest instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import TYPE_CHECKING

from megatrain.cli.common import run_command
from megatrain.data.prepare.train_tokenizer import DEFAULT_MAX_SENTENCES, TOKENIZER_TYPES
from megatrain.data.storage import redact
from megatrain.errors import EXIT_OK, DataError

if TYPE_CHECKING:
    from megatrain.data.manifest import Manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatrain-prepare",
        description="Tokenize a corpus into WebDataset shards with a manifest.json. Rerunning "
        "into the same --out continues an interrupted run.",
    )
    parser.add_argument(
        "--source",
        help="a .txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet file, glob or folder; WebDataset "
        ".tar shards (text in a txt member or a json member's --text-field) as files, globs, "
        "brace patterns (corpus-{000000..000127}.tar) or http(s):// / s3:// URLs; or 'stdlib'",
    )
    parser.add_argument("--out", help="output folder, or a URL (s3://bucket/prefix): staged in "
                        "$MEGATRAIN_CACHE/prepare-staging, each shard uploaded when complete, "
                        "manifest.json last")
    parser.add_argument("--verify", metavar="DIR|URL",
                        help="check a prepared corpus's shards against its manifest and exit")
    _tokenizer_options(parser)
    _task_options(parser)
    _shard_options(parser)
    _cleaning_options(parser)
    parser.add_argument("--text-field", default="text",
                        help="JSONL field / Parquet column / field of a WebDataset sample's json "
                        "member holding the text (default: text)")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _tokenizer_options(parser: argparse.ArgumentParser) -> None:
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--tokenizer", help="use this SentencePiece model, Hugging Face "
                       "tokenizer.json, or a folder holding one (a prepared corpus, a "
                       "checkpoint), or a megatrain run or checkpoints folder (its latest "
                       "checkpoint's tokenizer)")
    vocab.add_argument(
        "--vocab-size", type=int, default=8192, help="train a tokenizer of this size"
    )
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES,
                        help="SentencePiece model type to train (default: bpe)")
    parser.add_argument("--tokenizer-sample", type=int, metavar="LINES",
                        help="train on a uniform sample of at most this many lines "
                        f"(default: {DEFAULT_MAX_SENTENCES:,})")


def _task_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", metavar="sft|cls|seq2seq",
                        help="task data for fine-tuning, from .jsonl/.parquet rows: sft "
                        "{prompt, completion} or {messages}, cls {text, label} or {text_a, "
                        "text_b, label}, seq2seq {input, target} (default: pretraining text)")
    parser.add_argument("--template", metavar="plain|alpaca|chat",
                        help="how --format sft renders a row (default: plain); chat: the "
                        "chat_template of the --tokenizer's tokenizer.json")
    parser.add_argument("--labels", metavar="A,B,...",
                        help="--format cls: the label set in id order (default: the labels found, "
                        "sorted; numerically when all are integers)")


def _shard_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-fraction", type=float, default=0.01,
                        help="share of documents held out for eval (default 0.01); 1: an "
                        "eval-only folder, a fixed validation set for data.eval and "
                        "megatrain-eval (needs --tokenizer)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard-tokens", type=int,
                      help="close a shard at this many tokens (default: 1,000,000)")
    size.add_argument("--shard-bytes", type=int, help="close a shard at this many bytes")


def _cleaning_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--normalize", choices=("none", "NFC", "NFKC"), default="none",
                        help="Unicode normal form applied to every document (default: none)")
    parser.add_argument("--min-chars", type=int, default=0,
                        help="drop documents shorter than this (whitespace-trimmed)")
    parser.add_argument("--dedup", action="store_true",
                        help="drop exact duplicates of an earlier document (content hash)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify is None and (args.source is None or args.out is None):
        parser.error("--source and --out are required (or --verify DIR)")
    if args.tokenizer and (args.tokenizer_type or args.tokenizer_sample is not None):
        parser.error("--tokenizer-type and --tokenizer-sample train a tokenizer; "
                     "they do not apply to --tokenizer")
    logger = logging.getLogger("megatrain")
    handler, level = logging.StreamHandler(sys.stderr), logger.level
    handler.setFormatter(logging.Formatter("%(message)s"))  # resume and cleaning counts
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return run_command(lambda: _verify(args.verify) if args.verify is not None
                           else _prepare(args))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _prepare(args: argparse.Namespace) -> int:
    from megatrain.data.prepare.pipeline import prepare  # deferred: --help stays fast

    start = time.perf_counter()
    manifest = prepare(
        args.source,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        tokenizer_type=args.tokenizer_type or "bpe",
        tokenizer_sample=(DEFAULT_MAX_SENTENCES if args.tokenizer_sample is None
                          else args.tokenizer_sample),
        eval_fraction=args.eval_fraction,
        shard_tokens=args.shard_tokens,
        shard_bytes=args.shard_bytes,
        workers=args.workers,
        seed=args.seed,
        text_field=args.text_field,
        normalize=args.normalize,
        min_chars=args.min_chars,
        dedup=args.dedup,
        progress=not args.no_progress,
        format=args.format,
        template=args.template,
        labels=args.labels,
    )
    seconds = time.perf_counter() - start
    stats = manifest.stats
    tokens = stats["train_tokens"] + stats["eval_tokens"]
    shards = {split: len(manifest.splits[split]) for split in ("train", "eval")}
    if manifest.task is not None:
        print(_task_summary(args.out, manifest, shards, seconds))
        return EXIT_OK
    print(
        f"prepared {redact(args.out)}: {stats['documents']} docs, {tokens:,} tokens "
        f"(train {stats['train_tokens']:,}, eval {stats['eval_tokens']:,}), "
        f"shards train={shards['train']} eval={shards['eval']}, vocab {manifest.vocab_size}, "
        f"{tokens / seconds:,.0f} tokens/s in {seconds:.1f}s, "
        f"unigram entropy {stats['unigram_entropy']:.3f} nats/token; "
        f"read {stats['documents_read']} docs, dropped {stats['dropped_short']} short, "
        f"{stats['dropped_duplicate']} duplicate"
    )
    return EXIT_OK


def _task_summary(out: str, manifest: Manifest, shards: dict[str, int], seconds: float) -> str:
    stats, task = manifest.stats, manifest.task
    kind = task["format"] + (f" ({task['template']} template)" if task["template"] else "")
    labels = f", {len(task['labels'])} labels" if "labels" in task else ""
    return (
        f"prepared {redact(out)}: {kind}, {stats['documents']} rows (train "
        f"{stats['train_documents']}, eval {stats['eval_documents']}), "
        f"{stats['train_tokens'] + stats['eval_tokens']:,} tokens{labels}, shards "
        f"train={shards['train']} eval={shards['eval']}, vocab {manifest.vocab_size}, in "
        f"{seconds:.1f}s; read {stats['documents_read']} rows, dropped {task['dropped']} with no "
        f"target tokens, {stats['dropped_duplicate']} duplicate"
    )


def _verify(folder: str) -> int:
    from megatrain.data.prepare.verify import verify

    checks = verify(folder)
    for check in checks:
        print(check.line())
    bad = [c.name for c in checks if not c.ok]
    if bad:
        raise DataError(f"{redact(folder)}: {len(bad)} of {len(checks)} files failed "
                        f"verification: {', '.join(bad)}")
    print(f"verified {redact(folder)}: {len(checks) - 1} shards and the tokenizer match the "
          "manifest")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
