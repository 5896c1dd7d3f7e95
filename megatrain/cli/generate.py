"""``megatrain-generate``: generate text from a checkpoint (KV-cached, batched).

    megatrain-generate --checkpoint outputs/quickstart --prompt "def " --max-new-tokens 200
    megatrain-generate --checkpoint outputs/sft --prompts prompts.jsonl --out outputs.jsonl \\
        --temperature 0 --stop "\\n\\n" --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from megatrain.cli.common import run_command
from megatrain.data.prepare.sources import file_records
from megatrain.errors import ConfigError, DataError
from megatrain.models.generation import Sampling, generate_text
from megatrain.models.registry import get_model_spec
from megatrain.training.pretrained import load_checkpoint_model, load_trained_model

PROMPT_FIELDS = ("prompt", "input")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatrain-generate", description=__doc__.split("\n")[1])
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint folder, or a run folder (its latest checkpoint)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="text to continue")
    src.add_argument("--prompts", type=Path, metavar="FILE.jsonl",
                     help="one JSON object per line with a 'prompt' (or 'input') field")
    p.add_argument("--out", type=Path, metavar="OUT.jsonl",
                   help="write each --prompts row with its 'output' here (default: stdout)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filtering")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="Hugging Face's: > 1 discourages tokens already in the text; 1 = off")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop a row once its output contains TEXT (cut before it); repeatable")
    p.add_argument("--num-samples", type=int, default=1, help="samples per --prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true",
                   help="re-run the whole context each step (slow; for comparison)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(lambda: _generate(args))


def _sampling(args: argparse.Namespace) -> Sampling:
    """The checked arguments' sampling (``--top-k 0``: none); ConfigError for a bad one."""
    for name in ("batch_size", "num_samples"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.max_new_tokens < 0 or args.top_k < 0:
        raise ConfigError("--max-new-tokens and --top-k must be >= 0")
    try:
        return Sampling(args.temperature, args.top_k or None, args.top_p,
                        args.repetition_penalty)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _check_generates(checkpoint: str) -> None:
    """A masked LM (BERT) has nothing to generate with: say so before loading its weights."""
    family, _, _ = load_checkpoint_model(checkpoint, weights=False)
    spec = get_model_spec(family)
    if not spec.generates:
        raise ConfigError(f"--checkpoint {checkpoint} is a {family} model ({spec.objective}), "
                          "which does not generate text; use a gpt, llama or t5 checkpoint")


def read_prompts(path: Path) -> list[dict]:
    """The rows of a prompts file; each needs a string 'prompt' or 'input' (DataError naming
    file:line otherwise)."""
    if not path.is_file():
        raise DataError(f"--prompts {path}: no such file")
    rows = []
    for record in file_records(path):
        row = record.data
        field = next((f for f in PROMPT_FIELDS if isinstance(row, dict) and f in row), None)
        if field is None or not isinstance(row[field], str):
            raise DataError(f"{record.where}: expected a JSON object with a string 'prompt' "
                            "or 'input' field")
        rows.append(row)
    return rows


def _generate(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    _check_generates(args.checkpoint)
    rows = read_prompts(args.prompts) if args.prompts else None
    device = torch.device(args.device)
    model, tokenizer = load_trained_model(args.checkpoint, device)
    if rows is None:
        prompts = [args.prompt] * args.num_samples
    else:
        prompts = [row[next(f for f in PROMPT_FIELDS if f in row)] for row in rows]
    outputs = generate_text(
        model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, temperature=sampling.temperature, top_k=sampling.top_k,
        top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty, stop=args.stop,
        seed=args.seed, use_cache=not args.no_cache)
    if rows is None:
        for i, text in enumerate(outputs):
            if args.num_samples > 1:
                print(f"----- sample {i} -----")
            print(args.prompt + text)
        return 0
    lines = [json.dumps({**row, "output": text}, ensure_ascii=False) + "\n"
             for row, text in zip(rows, outputs, strict=True)]
    if args.out is None:
        sys.stdout.writelines(lines)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(lines), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
