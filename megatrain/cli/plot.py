"""``megatrain-plot``: loss, eval loss, LR and tokens/s curves of runs, to a PNG or SVG file.

    megatrain-plot outputs/quickstart outputs/quickstart-lr6e-4 --out curves.png
    megatrain-plot outputs/sweeps/lr --x tokens --metrics loss,eval_loss --out sweep.svg

Each RUN_DIR is a run folder (it holds ``metrics.jsonl``) or a sweep folder (its job subfolders
do); the legend names runs by ``run.name`` from their ``config.yaml``. Needs matplotlib
(``pip install 'megatrain[plot]'``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatrain.cli.common import run_command
from megatrain.metrics.plot import DEFAULT_METRICS, X_AXES, draw, find_runs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatrain-plot", description=__doc__.split("\n")[0]
                                .split(": ", 1)[1])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="a run folder (with metrics.jsonl) or a sweep folder (its jobs)")
    p.add_argument("--out", type=Path, default=Path("metrics.png"),
                   help="the image: .png, .svg or .pdf (default: metrics.png)")
    p.add_argument("--x", choices=list(X_AXES), default="step",
                   help="the x axis: optimizer steps or tokens seen")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help="comma-separated metrics.jsonl keys, one panel each "
                        f"(default: {','.join(DEFAULT_METRICS)})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(lambda: _plot(args))


def _plot(args: argparse.Namespace) -> int:
    runs = find_runs(args.runs)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    drawn = draw(runs, metrics, args.x, args.out)
    missing = [m for m in metrics if m not in drawn]
    print(f"{args.out}: {', '.join(drawn)} of {len(runs)} run(s) against {args.x}"
          + (f"; no run logs {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
