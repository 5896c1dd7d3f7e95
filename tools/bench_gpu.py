"""GPU benchmarks in one run: what a session with a GPU measures for docs/benchmarks.md.

    python tools/bench_gpu.py --out $OUT            # on the GPU (tools/gpu_session.sh runs it)
    python tools/bench_gpu.py --out /tmp/b --quick  # tiny sizes on any machine: checks the script

Sections (``--only`` picks some), each isolated so one failure does not lose the others, each
logging under ``--out``; the table comes last:

- ``matmul``: an 8192³ bf16 matmul, the practical peak MFU is also quoted against.
- ``attention``: causal attention forward + backward per backend (SDPA pinned to flash, SDPA
  with cuDNN first, flex, flash_attn when installed, eager), with the CUDA kernels the profiler
  saw, so the table shows which kernel really ran rather than which one was asked for.
- ``train``: the real trainer (DeepSpeed, bf16, stdlib corpus) with the fast paths on (attention
  ``auto``, compiled blocks, no per-step sync: ``trainer.skip_nonfinite=false``) for gpt2-small
  (T 1024), llama-1b (T 2048), bert-large (T 128) and t5-base, then comparisons (gpt2-small
  eager, llama-1b in fp8): tokens/s, TFLOP/s and MFU per GPU (PaLM formula 6N + 12·L·d·T; the
  trainer's own MFU against the datasheet peak, 989 TFLOP/s on an H100/H200, and ``MFU@N``
  against N, what the ``matmul`` section measured in the same run, or 790, what an 8192³ bf16
  matmul reaches there, when it did not run) from its own log rows after warm-up, peak memory,
  and ``megatrain-plan``'s figure for the same config. ``--budget-s`` stops starting new runs
  when the time is spent (one device command may run 10 minutes).
- ``anchors`` (printed last): each model against its published peer figure.

Timings: CUDA events after warm-up, medians (perf_counter on a CPU). Training throughput is the
trainer's own: tokens over wall time between log rows, which read the loss (one sync per row).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# TFLOP/s, an 8192³ bf16 matmul on these machines (769-798): the practical peak when the matmul
# section did not run
H100_MEASURED_MATMUL = 790.0
# Peers' published throughput per GPU: case → (what, figure, unit); tokens/s unless "seq/s".
ANCHORS = {
    "gpt2-small s1024": ("llm.c GPT-2 124M, per H100", 468_000, "tok/s"),
    "llama-1b s2048": ("MPT-1B, per H100 (41.8% MFU)", 45_500, "tok/s"),
    "bert-large s128": ("MLPerf BERT-large, per H100", 970, "seq/s"),
    "t5-base": ("nanoT5 t5-base, input tokens on an A100", 234_000, "tok/s"),
}


@dataclass
class Row:
    section: str
    case: str
    figures: dict[str, str] = field(default_factory=dict)


def median_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` after ``warmup`` calls: CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# --- matmul -----------------------------------------------------------------------------------

def bench_matmul(quick: bool, device: torch.device) -> list[Row]:
    n = 512 if quick else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = median_ms(lambda: a @ b, warmup=3 if quick else 10, iters=5 if quick else 50)
    tflops = 2 * n**3 / (ms / 1e3) / 1e12
    return [Row("matmul", f"{n}³ {str(dtype).removeprefix('torch.')}",
                {"ms": f"{ms:.3f}", "TFLOP/s": f"{tflops:.1f}"})]


# --- attention --------------------------------------------------------------------------------

def _kernels(fn: Callable[[], object]) -> str:
    """The GPU kernels one call of ``fn`` launched whose names say attention/flash/softmax."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    keep = [n for n in names if any(w in n.lower() for w in ("flash", "attn", "attention",
                                                             "softmax", "fmha", "triton"))]
    return "; ".join(sorted(k[:60] for k in keep)[:4]) or "-"


def _forward_backward(attend: Callable, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        out = attend(q, k, v, True, 0.0)
        out.backward(torch.ones_like(out))
    return step


def bench_attention(quick: bool, device: torch.device, log: Path) -> list[Row]:
    from megatrain.errors import ConfigError
    from megatrain.models.common.attention import make_attention_fn, resolve_attn_impl

    B, H, T, D = (2, 4, 128, 32) if quick else (8, 16, 2048, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for impl in ("sdpa", "cudnn", "flex", "flash_attn", "eager"):
        try:
            resolve_attn_impl(impl, device, dtype)
        except ConfigError as err:
            rows.append(Row("attention", impl, {"note": str(err)[:70]}))
            continue
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        step = _forward_backward(make_attention_fn(impl), q, k, v)
        try:
            ms = median_ms(step, warmup=2 if quick else 10, iters=3 if quick else 30)
        except Exception as err:  # noqa: BLE001 — one backend failing must not lose the others
            (log / f"attention-{impl}.txt").write_text(traceback.format_exc())
            rows.append(Row("attention", impl, {"note": f"failed: {err}"[:70]}))
            continue
        flops = 4 * B * H * T * T * D * 0.5 * 3.5  # causal half; backward 2.5× forward
        rows.append(Row("attention", f"{impl} B{B} H{H} T{T} D{D} causal fwd+bwd", {
            "ms": f"{ms:.3f}", "TFLOP/s": f"{flops / (ms / 1e3) / 1e12:.1f}",
            "kernels": _kernels(step) if device.type == "cuda" else "-"}))
    return rows


# --- training ---------------------------------------------------------------------------------

def train_cases(quick: bool) -> dict[str, list[str]]:
    """Name → overrides of the real trainer runs, in the order they run (the anchored ones
    first: a spent ``--budget-s`` drops the last)."""
    fast = ["trainer.compile=auto", "model.attn_impl=auto", "trainer.skip_nonfinite=false"]
    if quick:
        steps = ["trainer.max_steps=6", "trainer.log_every=2", "schedule.warmup_steps=2",
                 "trainer.micro_batch_size=4", *fast]
        return {"gpt2-tiny s64": ["model=gpt2-tiny", "data.seq_len=64", *steps],
                "llama-tiny s64": ["model=llama-tiny", "data.seq_len=64", *steps],
                "bert-tiny s64": ["model=bert-tiny", "data.seq_len=64", *steps],
                "t5-tiny": ["model=t5-tiny", "data.seq_len=64", *steps]}
    common = ["trainer.max_steps=50", "trainer.log_every=10", "schedule.warmup_steps=10", *fast]
    return {
        "gpt2-small s1024": ["model=gpt2-small", "data.seq_len=1024",
                             "trainer.micro_batch_size=16", *common],
        "llama-1b s2048": ["model=llama-1b", "data.seq_len=2048", "trainer.micro_batch_size=4",
                           *common],
        "bert-large s128": ["model=bert-large", "data.seq_len=128",
                            "trainer.micro_batch_size=128", *common],
        "t5-base": ["model=t5-base", "data.seq_len=512", "trainer.micro_batch_size=32",
                    *common],
        "gpt2-small s1024 eager": ["model=gpt2-small", "data.seq_len=1024",
                                   "trainer.micro_batch_size=16", *common,
                                   "trainer.compile=off"],
        "llama-1b s2048 fp8": ["model=llama-1b", "data.seq_len=2048",
                               "trainer.micro_batch_size=4", *common, "trainer.fp8=true"],
    }


def _planned_gb(overrides: list[str]) -> float:
    from megatrain.config.compose import compose_config
    from megatrain.training.memory_plan import plan_from_config

    return plan_from_config(compose_config(overrides), 1, None).total / 1e9


def bench_train(quick: bool, out: Path, log: Path, deadline: float = math.inf,
                matmul_tflops: float = H100_MEASURED_MATMUL) -> list[Row]:
    rows = []
    fixed = ["data=stdlib", "logger.wandb.mode=disabled", "logger.progress=false",
             "trainer.eval_every=100000", "trainer.save_every=100000"]
    for name, overrides in train_cases(quick).items():
        left = deadline - time.time()
        if left < 60:
            rows.append(Row("train", name, {"note": "skipped: --budget-s spent"}))
            continue
        run_dir = out / "train" / name.replace(" ", "_")
        args = [*fixed, *overrides, f"run.dir={run_dir}"]
        t0 = time.time()
        try:
            result = subprocess.run([sys.executable, "-m", "megatrain.train", *args], cwd=REPO,
                                    capture_output=True, text=True, check=False,
                                    timeout=None if math.isinf(left) else left)
        except subprocess.TimeoutExpired as err:
            (log / f"train-{run_dir.name}.log").write_text(str(err.stdout or "")[-20000:])
            rows.append(Row("train", name, {"note": "stopped: --budget-s spent"}))
            continue
        (log / f"train-{run_dir.name}.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            rows.append(Row("train", name, {"note": f"exit {result.returncode}, see log"}))
            continue
        rows.append(Row("train", name, _train_figures(run_dir, args, time.time() - t0,
                                                      matmul_tflops)))
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final save: GBs each
    return rows


def anchor_rows(rows: list[Row]) -> list[Row]:
    """Each anchored training case against its peer's published figure."""
    out = []
    for r in rows:
        if r.section != "train" or r.case not in ANCHORS or "tokens/s" not in r.figures:
            continue
        what, figure, unit = ANCHORS[r.case]
        tokens = float(r.figures["tokens/s"].replace(",", ""))
        ours = tokens / 128 if unit == "seq/s" else tokens  # bert-large: 128-token sequences
        out.append(Row("anchors", r.case, {
            "megatrain": f"{ours:,.0f} {unit}", "peer": f"{figure:,} {unit} ({what})",
            "ratio": f"{ours / figure:.2f}x", "MFU": r.figures.get("MFU", "-")}))
    return out


def _percent(value: float) -> str:
    return f"{value:.1%}" if value else "-"  # no peak known (a CPU): no MFU


def _measured_matmul(rows: list[Row]) -> float:
    """The matmul section's TFLOP/s in this run, else H100_MEASURED_MATMUL."""
    found = [float(r.figures["TFLOP/s"]) for r in rows
             if r.section == "matmul" and "TFLOP/s" in r.figures]
    return found[0] if found else H100_MEASURED_MATMUL


def _train_figures(run_dir: Path, args: list[str], wall_s: float,
                   matmul_tflops: float = H100_MEASURED_MATMUL) -> dict[str, str]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if "tokens_per_s" in r]
    steady = rows[1:] or rows  # the first interval holds start-up (and compilation)
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    tflops = statistics.median(r["tflops_per_device"] for r in steady)
    figures = {"tokens/s": f"{tps:,.0f}", "TFLOP/s": f"{tflops:.1f}",
               # the trainer's own MFU: against the datasheet peak (989 on an H100 SXM)
               "MFU": _percent(statistics.median(r["mfu"] or 0.0 for r in steady)),
               f"MFU@{matmul_tflops:.0f}": f"{tflops / matmul_tflops:.1%}",
               "peak GB": f"{max(r['mem_gb'] for r in rows):.1f}", "wall s": f"{wall_s:.0f}"}
    try:
        figures["plan GB"] = f"{_planned_gb(args):.1f}"
    except Exception as err:  # noqa: BLE001 — the plan is a comparison, not the measurement
        figures["plan GB"] = f"failed: {err}"[:40]
    return figures


# --- main -------------------------------------------------------------------------------------

def _table(rows: list[Row]) -> str:
    lines = []
    for section in dict.fromkeys(r.section for r in rows):
        lines.append(f"\n## {section}")
        for r in (r for r in rows if r.section == section):
            lines.append(f"- {r.case}: " + ", ".join(f"{k} {v}" for k, v in r.figures.items()))
    return "\n".join(lines)


def _environment(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return (f"device {name or device.type}; torch {torch.__version__}; "
            f"CUDA {torch.version.cuda}; python {platform.python_version()}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-gpu")))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script")
    parser.add_argument("--only", nargs="*", default=["matmul", "attention", "train"])
    parser.add_argument("--budget-s", type=float, default=math.inf,
                        help="start no training run after this many seconds from the start")
    args = parser.parse_args(argv)
    deadline = time.time() + args.budget_s
    log = args.out / "logs"
    log.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sections = {"matmul": lambda: bench_matmul(args.quick, device),
                "attention": lambda: bench_attention(args.quick, device, log),
                "train": lambda: bench_train(args.quick, args.out, log, deadline,
                                             _measured_matmul(rows))}
    rows: list[Row] = []
    for name in args.only:
        try:
            rows += sections[name]()
        except Exception as err:  # noqa: BLE001 — a failed section must not lose the others
            (log / f"{name}.txt").write_text(traceback.format_exc())
            rows.append(Row(name, "section failed", {"error": str(err)[:100]}))
        print(f"[{name} done]", flush=True)
    rows += anchor_rows(rows)
    report = f"# bench_gpu: {_environment(device)}{_table(rows)}\n"
    (args.out / "bench_gpu.md").write_text(report)
    print(report)
    return 0 if all("section failed" != r.case for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
