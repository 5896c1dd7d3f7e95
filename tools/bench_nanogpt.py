"""nanoGPT's CPU recipe, a plain PyTorch loop against megatrain's Trainer: where a step's time goes.

Both sides train megatrain's own GPT-2 class with the same dims, batch and schedule (nanoGPT's
baby GPT: 4 layers, 4 heads, d 128, block 64, batch 12, lr 1e-3, 100 warmup steps, cosine to
1e-4, beta2 0.99, no dropout, fp32), so only the loop differs:

- ``plain``: nanoGPT's loop — random contiguous windows of the raw token stream, forward,
  cross-entropy, backward, clip_grad_norm_, AdamW (decay on 2-D parameters), zero_grad; a
  ``loss.item()`` every ``--log-every`` steps.
- ``megatrain``: ``Trainer.train()`` in this process on the corpus ``megatrain-prepare`` wrote
  (a char tokenizer, the same 90/10 split), each part of ``train_step`` timed by wrappers set
  here (nothing in the library is changed): data hand-off, forward, backward, engine.step,
  guard, logging, throughput bookkeeping; collectives and host syncs (``.item()``, ``.tolist()``,
  ``bool``/``float``/``int`` of a tensor) counted per step.

Prepare the data once (tinyshakespeare, first 90% train, last 10% eval)::

    python tools/bench_nanogpt.py prepare --text /work/shared/data/tinyshakespeare/input.txt \\
        --out /tmp/nbench
    python tools/bench_nanogpt.py bench --data /tmp/nbench --steps 300 --repeat 2
    python tools/bench_nanogpt.py bench --data /tmp/nbench --steps 100 --cprofile 25

``bench`` alternates the two sides ``--repeat`` times (the machine may be shared: medians of
per-step wall and CPU time, and the load average, are reported). ``--quality`` runs
``--steps`` steps of each side to the end and reports the eval loss on the held-out 10%
(the whole split, the same windows for both).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import math
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPE = {"n_layers": 4, "n_heads": 4, "d_model": 128, "seq_len": 64, "batch": 12, "lr": 1e-3,
          "warmup": 100, "min_lr_ratio": 0.1, "betas": (0.9, 0.99), "weight_decay": 0.1,
          "grad_clip": 1.0}


# --- data -----------------------------------------------------------------------------------------

def prepare(text: Path, out: Path) -> None:
    """The first 90% of ``text`` (by characters, as nanoGPT splits) as a train corpus with a char
    tokenizer, the last 10% as a fixed eval corpus with the same tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    data = text.read_text()
    cut = int(len(data) * 0.9)
    (out / "train.txt").write_text(data[:cut])
    (out / "val.txt").write_text(data[cut:])
    prep = [sys.executable, "-m", "megatrain.prepare", "--no-progress"]
    subprocess.run([*prep, "--source", str(out / "train.txt"), "--out", str(out / "train"),
                    "--vocab-size", "512", "--tokenizer-type", "char", "--eval-fraction", "0"],
                   check=True)
    subprocess.run([*prep, "--source", str(out / "val.txt"), "--out", str(out / "val"),
                    "--tokenizer", str(out / "train"), "--eval-fraction", "1"], check=True)


def token_stream(data: Path, split: str) -> torch.Tensor:
    """The split's text as one stream of token ids (no EOS), nanoGPT's ``train.bin``."""
    from megatrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(data / "train" / "tokenizer.model")
    return torch.tensor(tok.encode((data / f"{split}.txt").read_text()), dtype=torch.long)


def random_windows(stream: torch.Tensor, batch: int, seq: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's ``get_batch``: ``batch`` random windows of ``seq + 1`` tokens."""
    ix = torch.randint(len(stream) - seq, (batch,), generator=gen)
    x = torch.stack([stream[i:i + seq] for i in ix])
    y = torch.stack([stream[i + 1:i + 1 + seq] for i in ix])
    return x, y


# --- the plain loop ----------------------------------------------------------------------------

def build_model(vocab_size: int, seed: int, bias: bool = True) -> torch.nn.Module:
    """megatrain's GPT-2 class with the recipe's dims (``bias=False``: nanoGPT's baby GPT, no
    biases in Linear and LayerNorm)."""
    from megatrain.models.gpt2.model import GPT, GPTConfig

    r = RECIPE
    cfg = GPTConfig(vocab_size=vocab_size, n_layers=r["n_layers"], n_heads=r["n_heads"],
                    d_model=r["d_model"], d_ff=4 * r["d_model"], max_seq_len=r["seq_len"])
    torch.manual_seed(seed)
    model = GPT(cfg, device="cpu", dtype=torch.float32)
    if not bias:
        _drop_biases(model)
    return model


def _drop_biases(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and module.bias is not None:
            module.bias = None


def nanogpt_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """nanoGPT's ``configure_optimizers``: decay on every parameter of 2 or more dims."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def lr_at(step: int, steps: int) -> float:
    """nanoGPT's ``get_lr`` (warmup from 0, cosine to min_lr at ``steps`` — the schedule's
    length, which a bench shorter than the warmup keeps at the recipe's 2000)."""
    steps = schedule_length(steps)
    r = RECIPE
    lr, min_lr = r["lr"], r["lr"] * r["min_lr_ratio"]
    if step < r["warmup"]:
        return lr * step / r["warmup"]
    ratio = min(1.0, (step - r["warmup"]) / max(1, steps - r["warmup"]))
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)


def schedule_length(steps: int) -> int:
    """The schedule's length for a run of ``steps``: the recipe's 2000 when shorter than that
    (a bench is a slice of the whole run), else ``steps``."""
    return steps if steps >= 2000 or steps > 2 * RECIPE["warmup"] else 2000


def stream_batches(data: Path, seed: int,
                   shuffle_rows: int = 1) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """megatrain's own training batches (shuffled documents, each followed by EOS, packed;
    a micro-batch is B consecutive rows of the packed stream, or rows shuffled among
    ``shuffle_rows`` micro-batches: ``data.shuffle_rows``), in this process."""
    from megatrain.data.manifest import Manifest
    from megatrain.data.stream.objectives import build_objective
    from megatrain.data.stream.train_stream import build_train_stream
    from megatrain.data.tokenizer import load_tokenizer

    r = RECIPE
    manifest = Manifest.load(data / "train")
    objective = build_objective("clm", r["seq_len"], load_tokenizer(manifest.tokenizer_path))
    stream = iter(build_train_stream(manifest, seq_len=r["seq_len"], micro_batch_size=r["batch"],
                                     seed=seed, rank=0, world_size=1, num_workers=0,
                                     objective=objective, shuffle_rows=shuffle_rows))

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(stream)
        return batch["input_ids"], batch["labels"]

    return next_batch


def plain_loop(data: Path, steps: int, log_every: int, seed: int = 1337, bias: bool = True,
               model: torch.nn.Module | None = None, order: str = "random",
               compact: bool = False, shuffle_rows: int = 1) -> dict[str, Any]:
    """nanoGPT's training loop on megatrain's model; per-step wall and CPU times. ``order``:
    nanoGPT's random windows, or megatrain's packed ``stream``; ``compact``: the text's own
    characters as the vocabulary instead of the char tokenizer's (bytes and specials too)."""
    r = RECIPE
    train = token_stream(data, "train")
    vocab = _vocab_size(data)
    if compact and order == "stream":
        raise SystemExit("--compact-vocab maps nanoGPT's random windows only, not the stream")
    if compact:  # nanoGPT's vocabulary: only the characters of the text (65 for Shakespeare)
        ids = torch.unique(torch.cat([train, token_stream(data, "val")]))
        vocab = len(ids)
        train = torch.searchsorted(ids, train)
    model = model or build_model(vocab, seed, bias)
    opt = torch.optim.AdamW(nanogpt_groups(model, r["weight_decay"]), lr=r["lr"],
                            betas=r["betas"])
    gen = torch.Generator().manual_seed(seed)
    if order == "stream":
        next_batch = stream_batches(data, seed, shuffle_rows)
    else:
        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            return random_windows(train, r["batch"], r["seq_len"], gen)
    walls, cpus, losses = [], [], []
    x, y = next_batch()
    for step in range(steps):
        t0, c0 = time.perf_counter_ns(), time.process_time_ns()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                               ignore_index=-100)
        x, y = next_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0:
            losses.append(loss.item())
        walls.append(time.perf_counter_ns() - t0)
        cpus.append(time.process_time_ns() - c0)
    return {"model": model, "wall_ns": walls, "cpu_ns": cpus, "losses": losses}


def _vocab_size(data: Path) -> int:
    return json.loads((data / "train" / "manifest.json").read_text())["tokenizer"]["vocab_size"]


@torch.no_grad()
def val_loss(model: torch.nn.Module, data: Path, batch: int = 64, compact: bool = False) -> float:
    """Mean token loss over every non-overlapping window of the held-out 10% (no EOS): the same
    number for both sides, and less noisy than nanoGPT's 20 random batches."""
    seq = RECIPE["seq_len"]
    stream = token_stream(data, "val")
    if compact:
        ids = torch.unique(torch.cat([token_stream(data, "train"), stream]))
        stream = torch.searchsorted(ids, stream)
    n = (len(stream) - 1) // seq
    xs = stream[:n * seq].view(n, seq)
    ys = stream[1:n * seq + 1].view(n, seq)
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, n, batch):
        logits = model(xs[i:i + batch])
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                       ys[i:i + batch].reshape(-1), reduction="sum"))
    model.train(was)
    return total / (n * seq)


# --- megatrain ------------------------------------------------------------------------------------

def megatrain_overrides(data: Path, steps: int, run_dir: Path, log_every: int,
                        extra: list[str]) -> list[str]:
    r = RECIPE
    return [f"data.train={data / 'train'}", f"data.eval={data / 'val'}",
            f"data.seq_len={r['seq_len']}", "model=gpt2-tiny", f"model.n_layers={r['n_layers']}",
            f"model.n_heads={r['n_heads']}", f"model.d_model={r['d_model']}",
            f"model.max_seq_len={r['seq_len']}", f"trainer.micro_batch_size={r['batch']}",
            f"optim.lr={r['lr']}", f"optim.betas=[{r['betas'][0]},{r['betas'][1]}]",
            f"optim.weight_decay={r['weight_decay']}", f"schedule.warmup_steps={r['warmup']}",
            f"schedule.min_lr_ratio={r['min_lr_ratio']}",
            f"schedule.total_steps={schedule_length(steps)}", f"trainer.grad_clip={r['grad_clip']}",
            f"trainer.max_steps={steps}", "trainer.precision=fp32",
            f"trainer.log_every={log_every}", f"trainer.eval_every={10 ** 8}",
            "trainer.eval_steps=1", f"trainer.save_every={10 ** 8}", "trainer.keep_last=1",
            f"run.dir={run_dir}", "run.resume=never", "logger.wandb.mode=disabled",
            "logger.progress=false", *extra]


class Timers:
    """Wall time per named part, per step (a part may run several times in a step)."""

    def __init__(self) -> None:
        self.current: collections.Counter[str] = collections.Counter()
        self.steps: list[dict[str, int]] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.sync_sites: collections.Counter[str] = collections.Counter()
        self.in_step = False

    def wrap(self, owner: Any, name: str, part: str) -> None:
        """Replace ``owner.name`` by a timed wrapper that adds to ``part``."""
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter_ns(), time.process_time_ns()
            try:
                return inner(*args, **kwargs)
            finally:
                self.current[part] += time.perf_counter_ns() - t0
                self.current[part + " cpu"] += time.process_time_ns() - c0

        setattr(owner, name, timed)

    def count(self, owner: Any, name: str, what: str) -> Callable[[], None]:
        """Count calls of ``owner.name`` made inside a step (its call site for host syncs);
        returns the undo."""
        inner = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.in_step:
                self.counts[what] += 1
                if what == "host_sync":
                    frame = sys._getframe(1)
                    file = frame.f_code.co_filename.rsplit("/", 1)[-1]
                    site = f"{file}:{frame.f_lineno} {name}"
                    self.sync_sites[site] += 1
            return inner(*args, **kwargs)

        setattr(owner, name, counted)
        return lambda: setattr(owner, name, inner)


SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")
COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "reduce_scatter", "barrier",
               "all_gather_into_tensor", "reduce_scatter_tensor")


def instrument(trainer: Any, timers: Timers) -> list[Callable[[], None]]:
    """Time the parts of ``trainer.train_step`` and count syncs and collectives."""
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    t = trainer
    timers.wrap(t, "_micro_batches", "data")
    timers.wrap(t, "_token_weights", "token_weights")
    timers.wrap(t, "_loss", "forward+loss")
    timers.wrap(t.engine, "backward", "backward")
    timers.wrap(t.engine, "step", "engine.step")
    timers.wrap(t, "_own_grad_norm", "grad_norm")
    timers.wrap(t, "_judge", "guard.check")
    timers.wrap(t, "_deepspeed_skipped_it", "was_step_applied")
    timers.wrap(t.optimizer.finetune, "begin_step", "finetune.begin_step")
    timers.wrap(t.throughput, "add", "throughput")
    timers.wrap(t.stream, "pop_trace", "pop_trace")
    if t.guard is not None:
        timers.wrap(t.guard, "settle", "guard.settle")
    undo = [timers.count(torch.Tensor, m, "host_sync") for m in SYNC_METHODS]
    for name in COLLECTIVES:
        for module in (dist, ds_comm):
            if hasattr(module, name):
                undo.append(timers.count(module, name, f"collective:{name}"))
    timers.wrap(t, "_log_train", "logging")
    inner_step = t.train_step
    state = {"last": None, "cpu": None}

    def train_step(*args: Any, **kwargs: Any) -> Any:
        now, cpu = time.perf_counter_ns(), time.process_time_ns()
        if state["last"] is not None:  # the whole previous iteration, loop body included
            timers.current["iteration"] = now - state["last"]
            timers.current["iteration_cpu"] = cpu - state["cpu"]
            timers.steps.append(dict(timers.current))
        timers.current = collections.Counter()
        state["last"], state["cpu"] = now, cpu
        timers.in_step = True
        t0 = time.perf_counter_ns()
        try:
            return inner_step(*args, **kwargs)
        finally:
            timers.current["train_step"] += time.perf_counter_ns() - t0

    t.train_step = train_step
    inner_eval = t.evaluate

    def evaluate(*args: Any, **kwargs: Any) -> Any:
        timers.in_step = False
        state["last"] = None  # the iteration with an eval is not a training step's time
        return inner_eval(*args, **kwargs)

    t.evaluate = evaluate
    return undo


def megatrain_run(data: Path, steps: int, log_every: int, extra: list[str],
                  profile: int = 0) -> dict[str, Any]:
    """``Trainer.train()`` for ``steps`` steps, instrumented; its per-step parts."""
    from megatrain.config.compose import compose_config
    from megatrain.distributed import detect_world, init_distributed
    from megatrain.metrics import setup_console_logging

    run_dir = Path(tempfile.mkdtemp(prefix="bench_nanogpt."))
    cfg = compose_config(megatrain_overrides(data, steps, run_dir, log_every, extra))
    world = detect_world()
    setup_console_logging(world.rank)
    device = init_distributed(world, cfg.trainer.collective_timeout_s)
    from megatrain.training.trainer import Trainer

    trainer = Trainer(cfg, world, device)
    timers = Timers()
    undo = instrument(trainer, timers)
    profiler = cProfile.Profile() if profile else None
    try:
        if profiler:
            profiler.enable()
        trainer.train()
    finally:
        if profiler:
            profiler.disable()
        for u in undo:
            u()
        trainer.close()
    shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoint and metrics: not needed
    result = {"steps": timers.steps, "counts": dict(timers.counts),
              "sync_sites": dict(timers.sync_sites), "model": trainer.engine.module}
    if profiler:
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
        stats.print_stats(profile)
        stats.print_callers("named_parameters|parameters|_named_members|record_function|"
                            "all_reduce|_get_value")
        result["cprofile"] = out.getvalue()
    return result


# --- report ---------------------------------------------------------------------------------------

def median_ms(values: list[int]) -> float:
    return statistics.median(values) / 1e6 if values else 0.0


PARTS = ("data", "token_weights", "forward+loss", "backward", "grad_norm", "guard.check",
         "engine.step", "was_step_applied", "guard.settle", "throughput", "pop_trace",
         "finetune.begin_step", "logging")


def breakdown(steps: list[dict[str, int]], skip: int) -> dict[str, float]:
    """Median ms per part over the steps after the first ``skip``; ``loop`` is the iteration's
    time outside ``train_step`` (logging and the loop's own bookkeeping); ``other`` what no part
    covers inside ``train_step``."""
    rows = steps[skip:]
    out = {part: statistics.mean(r.get(part, 0) for r in rows) / 1e6 for part in PARTS}
    out |= {f"{part} cpu": statistics.mean(r.get(f"{part} cpu", 0) for r in rows) / 1e6
            for part in PARTS if part != "logging"}
    out["train_step (median)"] = median_ms([r["train_step"] for r in rows])
    out["iteration (median)"] = median_ms([r["iteration"] for r in rows])
    out["iteration cpu (median)"] = median_ms([r["iteration_cpu"] for r in rows])
    inner = [r["train_step"] - sum(r.get(p, 0) for p in PARTS if p != "logging") for r in rows]
    out["other in train_step"] = statistics.mean(inner) / 1e6
    out["loop outside train_step"] = statistics.mean(
        r["iteration"] - r["train_step"] for r in rows) / 1e6
    return out


def bench(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    report: dict[str, Any] = {"load_avg": os.getloadavg(), "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "steps": args.steps}
    plain_w, plain_c, mt_steps, counts, sites = [], [], [], collections.Counter(), {}
    for rep in range(args.repeat):
        if not args.megatrain_only:
            p = plain_loop(args.data, args.steps, args.log_every, bias=not args.no_bias)
            plain_w += p["wall_ns"][args.skip:]
            plain_c += p["cpu_ns"][args.skip:]
        m = megatrain_run(args.data, args.steps, args.log_every, args.override,
                          args.cprofile if rep == 0 else 0)
        mt_steps += m["steps"][args.skip:]
        counts.update(m["counts"])
        sites = m["sync_sites"]
        if "cprofile" in m:
            report["cprofile"] = m["cprofile"]
    n_steps = args.repeat * args.steps
    report["plain"] = {"step_ms (median)": median_ms(plain_w),
                       "step_cpu_ms (median)": median_ms(plain_c)}
    report["megatrain"] = breakdown(mt_steps, 0)
    report["per_step_counts"] = {k: v / n_steps for k, v in sorted(counts.items())}
    report["host_sync_sites (last run)"] = dict(sorted(sites.items(), key=lambda kv: -kv[1]))
    report["load_avg_end"] = os.getloadavg()
    text = report.pop("cprofile", None)
    print(json.dumps(report, indent=1, default=float))
    if text:
        print(text)


def quality(args: argparse.Namespace) -> None:
    """Both sides to ``--steps``; the held-out loss of each."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    out: dict[str, Any] = {"steps": args.steps, "load_avg": os.getloadavg()}
    if not args.megatrain_only:
        start = time.perf_counter()
        p = plain_loop(args.data, args.steps, args.log_every, seed=args.seed,
                       bias=not args.no_bias, order=args.order, compact=args.compact_vocab,
                       shuffle_rows=args.shuffle_rows)
        out["plain"] = {"val_loss": val_loss(p["model"], args.data, compact=args.compact_vocab),
                        "seed": args.seed, "compact_vocab": args.compact_vocab,
                        "wall_s": time.perf_counter() - start, "bias": not args.no_bias,
                        "order": args.order, "shuffle_rows": args.shuffle_rows}
    if args.plain_only:
        print(json.dumps(out, indent=1, default=float))
        return
    start = time.perf_counter()
    overrides = [*args.override, f"data.shuffle_rows={args.shuffle_rows}"]
    m = megatrain_run(args.data, args.steps, args.log_every, overrides)
    out["megatrain"] = {"val_loss": val_loss(m["model"], args.data),
                        "wall_s": time.perf_counter() - start, "overrides": overrides}
    print(json.dumps(out, indent=1, default=float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="split a text 90/10 and prepare both with a char "
                          "tokenizer")
    prep.add_argument("--text", type=Path, required=True)
    prep.add_argument("--out", type=Path, required=True)
    for name in ("bench", "quality"):
        p = sub.add_parser(name)
        p.add_argument("--data", type=Path, required=True, help="the folder prepare wrote")
        p.add_argument("--steps", type=int, default=200)
        p.add_argument("--log-every", type=int, default=10)
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
        p.add_argument("--no-bias", action="store_true", help="plain side without biases "
                       "(nanoGPT's baby GPT)")
        p.add_argument("--megatrain-only", action="store_true")
        p.add_argument("--override", action="append", default=[],
                       help="an extra megatrain-train override (repeatable)")
        if name == "bench":
            p.add_argument("--repeat", type=int, default=1)
            p.add_argument("--skip", type=int, default=10, help="warm-up steps left out")
            p.add_argument("--cprofile", type=int, default=0, metavar="N",
                           help="cProfile the first megatrain run; print the top N by tottime")
        else:
            p.add_argument("--seed", type=int, default=1337)
            p.add_argument("--order", choices=("random", "stream"), default="random",
                           help="the plain loop's batches: nanoGPT's random windows or "
                           "megatrain's packed stream")
            p.add_argument("--plain-only", action="store_true")
            p.add_argument("--shuffle-rows", type=int, default=1, metavar="K",
                           help="data.shuffle_rows for the Trainer and for --order stream: "
                           "rows shuffled among K micro-batches (1: adjacent)")
            p.add_argument("--compact-vocab", action="store_true",
                           help="plain loop: the text's characters only (nanoGPT's 65)")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.text, args.out)
    elif args.command == "bench":
        bench(args)
    else:
        quality(args)


if __name__ == "__main__":
    main()
