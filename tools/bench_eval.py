"""megatrain-eval's perplexity throughput against the training forward's, same model, same
device, one run (docs/benchmarks.md, "Evaluation").

    python tools/bench_eval.py --size gpt2-tiny --seq-len 256 --docs 32 --repeats 3

Rows (tokens/s of *scored* tokens for eval, of trained tokens for training):
- ``eval, docs fit the context``: documents shorter than the context, one window each;
- ``eval, stride S``: one long document slid across with ``--stride`` (each token is read
  ``seq_len / stride`` times, so it costs that much more);
- ``train forward``: ``model.train()``, forward + cross-entropy with autograd on (no backward),
  packed rows of ``seq_len``;
- ``train forward+backward``: the same plus ``loss.backward()``.
Random weights and token ids: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from megatrain.eval.inputs import TextDoc
from megatrain.eval.lm import perplexity
from megatrain.eval.model import EvalModel
from megatrain.models.registry import build_model


def _best(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    """(best seconds, tokens) of ``repeats`` calls of ``fn`` (which returns its token count)."""
    times, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        times.append(time.perf_counter() - start)
    return min(times), tokens


class _Tok:
    """The one thing perplexity asks of a tokenizer here: an EOS id."""

    eos_id = 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="gpt")
    p.add_argument("--size", default="gpt2-tiny")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--stride", type=int, default=None, help="default: half the context")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, _, _ = build_model({"family": args.family, "size": args.size,
                               "max_seq_len": args.seq_len}, args.vocab, device)
    rng = np.random.default_rng(0)
    short = [TextDoc(rng.integers(1, args.vocab, args.seq_len - 2), 1) for _ in range(args.docs)]
    long = [TextDoc(rng.integers(1, args.vocab, args.seq_len * args.docs - 2), 1)]
    loaded = EvalModel("bench", model.eval(), _Tok(), None, None)  # type: ignore[arg-type]
    rows = torch.from_numpy(rng.integers(1, args.vocab, (args.batch_size, args.seq_len + 1)))
    rows = rows.to(device)

    def train_step(backward: bool) -> int:
        model.train()
        for _ in range(args.docs // args.batch_size):
            logits = model(rows[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
            if backward:
                loss.backward()
        model.zero_grad(set_to_none=True)
        return args.docs // args.batch_size * args.batch_size * args.seq_len

    stride = args.stride or args.seq_len // 2
    cases = {
        "eval, docs fit the context": lambda: perplexity(
            loaded, short, batch_size=args.batch_size)["tokens"],
        f"eval, one long document, stride {stride}": lambda: perplexity(
            loaded, long, stride=stride, batch_size=args.batch_size)["tokens"],
        "train forward": lambda: train_step(False),
        "train forward+backward": lambda: train_step(True),
    }
    print(f"{args.family} {args.size}, seq_len {args.seq_len}, batch {args.batch_size}, "
          f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| case | tokens | best s | tokens/s |\n|---|---|---|---|")
    for name, fn in cases.items():
        fn()  # warm-up
        seconds, tokens = _best(fn, args.repeats)
        print(f"| {name} | {tokens:,} | {seconds:.3f} | {tokens / seconds:,.0f} |")


if __name__ == "__main__":
    main()
