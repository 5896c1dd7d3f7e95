"""``megatrain-eval``: score a checkpoint on held-out data (docs/evaluation.md).

    megatrain-eval --checkpoint outputs/quickstart --task perplexity --data valid.txt \\
        --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from megatrain.cli.common import run_command
from megatrain.errors import ConfigError
from megatrain.eval.run import LM_EVAL_PREFIX, TASKS, Settings, evaluate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatrain-eval", description=__doc__.split("\n")[1])
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint, checkpoints or run folder, or hf:DIR (a Hugging Face "
                        "folder)")
    p.add_argument("--task", required=True,
                   help=f"{' | '.join(TASKS)} | {LM_EVAL_PREFIX}TASK[,TASK...]")
    p.add_argument("--data", help="a .txt, .jsonl or .parquet file, or a prepared folder (its "
                                  "eval split)")
    p.add_argument("--out", default="results.json", help="where the result JSON goes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-examples", type=int, default=None,
                   help="score the first N documents or rows only")
    p.add_argument("--max-new-tokens", type=int, default=128, help="bleu, rouge")
    p.add_argument("--stride", type=int, default=None,
                   help="perplexity: tokens between sliding windows (default: half the context)")
    p.add_argument("--seed", type=int, default=0, help="mlm: the masks' seed")
    p.add_argument("--bleu-tokenize", default="auto",
                   help="sacrebleu's tokenizer (13a, zh, intl, char, ja-mecab, ...); auto: zh "
                        "for mostly-Chinese references, else 13a")
    p.add_argument("--include-path", default=None, help="lm-eval: a folder of task YAMLs")
    p.add_argument("--lm-eval-backend", default="native", choices=("native", "hf"),
                   help="lm-eval: megatrain's model (native) or its Hugging Face export (hf)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(lambda: _eval(args), label="megatrain-eval")


def _eval(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.task.startswith(LM_EVAL_PREFIX):
        return _lm_eval(args, out)
    settings = Settings(args.task, args.batch_size, args.max_examples, args.max_new_tokens,
                        args.stride, args.seed, args.bleu_tokenize)
    if not args.data:
        raise ConfigError(f"--task {args.task} needs --data")
    result = evaluate(args.checkpoint, args.data, settings, out, torch.device(args.device))
    print(json.dumps({"task": args.task, **result["metrics"]}, ensure_ascii=False))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _lm_eval(args: argparse.Namespace, out: Path) -> int:
    """lm-evaluation-harness tasks (megatrain.eval.lm_harness)."""
    from megatrain.eval.lm_harness import run_harness

    tasks = args.task[len(LM_EVAL_PREFIX):].split(",")
    result = run_harness(args.checkpoint, tasks, backend=args.lm_eval_backend,
                         include_path=args.include_path, limit=args.max_examples,
                         batch_size=args.batch_size, device=args.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
