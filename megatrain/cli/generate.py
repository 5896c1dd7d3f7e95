"""``megatrain-generate``: sample text from a checkpoint.

    megatrain-generate --checkpoint outputs/quickstart --prompt "def " --max-new-tokens 200
"""

from __future__ import annotations

import argparse
import sys

import torch

from megatrain.cli.common import run_command
from megatrain.models.generation import generate
from megatrain.training.pretrained import load_trained_model


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatrain-generate", description=__doc__.split("\n")[1])
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filtering")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(lambda: _generate(args))


def _generate(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    model, tokenizer = load_trained_model(args.checkpoint, device)
    prompt = tokenizer.encode(args.prompt) or [tokenizer.eos_id]
    ids = torch.tensor([prompt] * args.num_samples, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, ids, args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k or None, eos_id=tokenizer.eos_id, generator=gen)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"----- sample {i} -----")
        print(tokenizer.decode(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
