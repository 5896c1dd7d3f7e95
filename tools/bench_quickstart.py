"""The quickstart as a speedrun: eval bits per byte against wall time, for issue 16's figures.

Runs ``megatrain-train experiment=quickstart`` (plus your overrides) as a user would, stamps each
eval row with the seconds since the command started (read from its log as it is written), and
writes the curve, the whole command's wall time, the final bits per byte and the sample to JSON.
``--plot`` draws the curves of several such files into one picture.

    python tools/bench_quickstart.py run --label before --out before.json
    python tools/bench_quickstart.py run --label after --out after.json -- optim.lr=3e-3
    python tools/bench_quickstart.py plot before.json after.json --out docs/img/speedrun.png
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EVAL_LINE = re.compile(r"step (\d+) \| eval_loss ([\d.]+) .*eval_bpb ([\d.]+)")
DONE_LINE = re.compile(r"done: step (\d+)")


def run(label: str, overrides: list[str], eval_every: int) -> dict:
    """One quickstart command, its eval rows stamped with seconds since it started."""
    with tempfile.TemporaryDirectory(prefix="speedrun.") as run_dir:
        cmd = [sys.executable, "-m", "megatrain.train", "experiment=quickstart",
               f"run.dir={run_dir}", "logger.wandb.mode=disabled", "logger.progress=false",
               f"trainer.eval_every={eval_every}", *overrides]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=os.environ | {"PYTHONUNBUFFERED": "1"})
        curve, trained_s = [], None
        for line in proc.stderr:
            sys.stderr.write(line)
            now = time.monotonic() - start
            if m := EVAL_LINE.search(line):
                curve.append({"s": round(now, 1), "step": int(m[1]),
                              "eval_loss": float(m[2]), "eval_bpb": float(m[3])})
            elif DONE_LINE.search(line):
                trained_s = round(now, 1)
        stdout = proc.stdout.read()
        if proc.wait() != 0:
            raise SystemExit(f"{label}: megatrain-train failed (exit {proc.returncode})")
    sample = stdout.split("-----\n", 1)[1].rsplit("-----", 1)[0] if "-----\n" in stdout else ""
    return {"label": label, "overrides": overrides, "wall_s": round(time.monotonic() - start, 1),
            "trained_s": trained_s, "final_bpb": curve[-1]["eval_bpb"] if curve else None,
            "curve": curve, "sample": sample, "threads": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}


def plot(files: list[Path], out: Path) -> None:
    """Eval bits per byte against seconds since the command started, one line per file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for path in files:
        result = json.loads(path.read_text())
        xs = [p["s"] for p in result["curve"]]
        ax.plot(xs, [p["eval_bpb"] for p in result["curve"]], marker="o", ms=3,
                label=f"{result['label']} ({result['final_bpb']:.3f} at {result['wall_s']:.0f} s)")
    ax.set(xlabel="seconds since megatrain-train started", ylabel="eval bits per byte",
           title="quickstart: held-out bits per byte against wall time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one quickstart command, timed")
    r.add_argument("--label", required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--eval-every", type=int, default=50)
    r.add_argument("overrides", nargs="*", help="after --: Hydra overrides")
    p = sub.add_parser("plot", help="draw the curves of several runs")
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.cmd == "run":
        result = run(args.label, args.overrides, args.eval_every)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"{result['label']}: {result['final_bpb']} bits/byte, {result['wall_s']} s wall "
              f"({result['trained_s']} s to the last eval)")
    else:
        plot(args.files, args.out)


if __name__ == "__main__":
    main()
