"""``megatrain-generate``: sample text from a checkpoint.

    megatrain-generate --checkpoint outputs/quickstart --prompt "def " --max-new-tokens 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from megatrain.data.tokenizer import Tokenizer, load_tokenizer
from megatrain.errors import MegatrainError
from megatrain.models.generation import generate
from megatrain.models.registry import get_model_spec


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[nn.Module, Tokenizer]:
    """A plain fp32 model and its tokenizer from a checkpoint, checkpoints or run folder."""
    from megatrain.training.checkpoint import resolve_checkpoint_path
    from megatrain.training.init_from import load_checkpoint_model

    family, config, state_dict = load_checkpoint_model(checkpoint)
    model = get_model_spec(family).build(config, device, torch.float32)
    model.load_state_dict(state_dict)
    path = resolve_checkpoint_path(Path(checkpoint))
    return model.eval(), load_tokenizer(path)


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
    try:
        device = torch.device(args.device)
        model, tokenizer = load_model(args.checkpoint, device)
    except MegatrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
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
