"""Peak memory and time of the loss with the whole logits and chunked, forward + backward.

Each case runs in a fresh subprocess, so the peak is its own: the resident-set high-water mark
(``VmHWM`` in /proc/self/status, reset through /proc/self/clear_refs where the kernel allows)
minus the resident set just before the loss, on the CPU. A case is the output head and the loss
of one micro-batch (``--batches`` rows of ``--seq`` tokens, hidden size ``--hidden``,
``--vocab`` classes, head and hidden states in ``--dtype``: fp32 or bf16), through the
trainer's own path: ``LMHead`` and ``losses.training_loss``, the logits whole (``full``) or
``loss_chunk`` rows at a time. Beside each measured peak is the planner's figure for it
(``memory_plan.loss_bytes``).

    python tools/bench_loss_memory.py --vocab 128256 --seq 2048 --hidden 512 --batches 1 2 4

A full case whose planned peak is more than ``--max-gb`` (default: half the memory available
now) is not run: its row gives the planner's estimate only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatrain.models.common.chunked_ce import LMHead
from megatrain.training.losses import CHUNK_LOGITS, loss_chunk, training_loss
from megatrain.training.memory_plan import loss_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_case(mode: str, batch: int, seq: int, hidden: int, vocab: int, chunk: int,
             dtype: str = "fp32") -> dict:
    """One forward + backward of the head and the loss; its peak bytes above the start."""
    torch.manual_seed(0)
    head = LMHead(hidden, vocab, bias=False).to(DTYPES[dtype])
    x = torch.randn(batch, seq, hidden, dtype=DTYPES[dtype], requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[:, :seq // 8] = -100  # some unlabelled positions, as a prompt or padding makes
    rows = {"labels": labels}
    # warm the kernels on a tiny slice so their one-off buffers are not the case's peak
    training_loss(head(x[:1, :8]), {"labels": labels[:1, :8]}, "sum")[0].backward()
    x.grad = head.weight.grad = None
    base, reset = _status_kb("VmRSS"), _reset_peak()
    start = time.perf_counter()
    out = head(x) if mode == "full" else head(x, labels, chunk)
    loss, _ = training_loss(out, rows, "sum")
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")  # without the reset: the process's peak so far, no lower
    return {"peak_gb": (peak - base) * 1024 / 1e9, "seconds": seconds, "loss": loss.item(),
            "peak_reset": reset}


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] * 1024 / 1e9


def _subprocess(args: argparse.Namespace, mode: str, batch: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--case", mode, "--batches", str(batch), "--seq",
           str(args.seq), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
           "--chunk", str(chunk), "--dtype", args.dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--chunk", type=int, default=0, help="rows per chunk; 0: the trainer's "
                   f"choice (trainer.chunked_loss=on: {CHUNK_LOGITS} logits per chunk)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="the head's and the hidden states' dtype (the loss is fp32 either way)")
    p.add_argument("--max-gb", type=float, default=None)
    p.add_argument("--case", choices=("full", "chunked"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        print(json.dumps(run_case(args.case, args.batches[0], args.seq, args.hidden, args.vocab,
                                  args.chunk, args.dtype)))
        return
    max_gb = args.max_gb if args.max_gb is not None else _available_gb() / 2
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{datetime.date.today().isoformat()}; vocab {args.vocab}, seq {args.seq}, "
          f"hidden {args.hidden}, {args.dtype}, forward + backward of head and loss; planned: "
          "memory_plan.loss_bytes\n")
    print(f"| batch | logits GB ({args.dtype}) | full: planned GB | full: peak GB | full: s "
          "| chunk rows | chunked: planned GB | chunked: peak GB | chunked: s | loss equal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    b = torch.finfo(DTYPES[args.dtype]).bits // 8
    for batch in args.batches:
        tokens = batch * args.seq
        chunk = args.chunk or loss_chunk("on", args.vocab, tokens)
        logits_gb = tokens * args.vocab * b / 1e9
        planned_full = loss_bytes(args.vocab, args.hidden, tokens, b) / 1e9
        planned_chunked = loss_bytes(args.vocab, args.hidden, tokens, b, rows=chunk) / 1e9
        chunked = _subprocess(args, "chunked", batch, chunk)
        if planned_full > max_gb:
            full_cells = "not run | –"
            same = "–"
        else:
            full = _subprocess(args, "full", batch, chunk)
            full_cells = f"{full['peak_gb']:.2f} | {full['seconds']:.1f}"
            same = f"{abs(full['loss'] - chunked['loss']) / abs(full['loss']):.1e} rel"
        print(f"| {batch} | {logits_gb:.2f} | {planned_full:.2f} | {full_cells} | {chunk} | "
              f"{planned_chunked:.2f} | {chunked['peak_gb']:.2f} | {chunked['seconds']:.1f} "
              f"| {same} |", flush=True)


if __name__ == "__main__":
    main()
