"""Generation throughput: megatrain's KV-cached and uncached decoding against ``transformers``'
``generate`` on the exported model, in one run; results go to docs/benchmarks.md.

    python tools/bench_generate.py [--models gpt2-small llama-100m] [--batch-sizes 1 16]
                                   [--prompt-len 128] [--new-tokens 256] [--uncached-tokens 8]
                                   [--context 512] [--device cpu] [--threads N]

For each model (random weights: speed does not depend on them) and batch size: greedy decoding of
``--new-tokens`` after a ``--prompt-len`` random prompt (no EOS: every row runs to the end),
tokens/s = batch · new tokens / wall seconds, prompt processing included — megatrain with the
cache, ``transformers`` ``generate`` (its default dynamic cache, SDPA attention) on the same
weights converted by megatrain's Hugging Face export, and megatrain without the cache over only
the first ``--uncached-tokens`` tokens (re-running the whole context each step is too slow to run
to the end on a CPU; its rate would fall further as the context grows). The first tokens of the
cached and the ``transformers`` run are checked to be equal.

``--context``: per-token time of one decode step after a prompt of that many tokens (batch 1),
cached (one token through the cache) and uncached (the whole context again), from direct model
calls: the ratio the cache buys at that length.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatrain.models.generation import generate
from megatrain.models.registry import MODEL_SPECS, resolve_model_config

# name -> (family, model config); llama-100m: a ~100M Llama shape (GQA 12/4 heads, untied head)
MODELS = {
    "gpt2-small": ("gpt", {"family": "gpt", "size": "gpt2-small"}, 50257),
    "llama-100m": ("llama", {"family": "llama", "size": "llama-tiny", "n_layers": 12,
                             "d_model": 768, "n_heads": 12, "n_kv_heads": 4, "d_ff": 2048,
                             "max_seq_len": 2048, "tie_embeddings": False}, 32000),
}


def build(name: str, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """megatrain's model (random init) and transformers' model loaded from its export."""
    import transformers

    family, model_cfg, vocab = MODELS[name]
    spec = MODEL_SPECS[family]
    config = resolve_model_config(model_cfg, vocab)
    model = spec.build(config, device, torch.float32).eval()
    hf_config = spec.hf.hf_config(config)
    hf = getattr(transformers, spec.hf.architecture)._from_config(
        hf_config, attn_implementation="sdpa", dtype=torch.float32)
    hf.load_state_dict(spec.hf.state_dict_to_hf(model.state_dict()), strict=False)
    if getattr(config, "tie_embeddings", True) and family == "gpt":
        hf.tie_weights()
    return model, hf.to(device).eval()


def timed(fn: object, device: torch.device) -> tuple[float, object, float]:
    """(wall seconds, fn's result, CPU seconds of this process's threads): on a shared machine
    the CPU time says what the work costs, the wall time how much CPU it got."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out, time.process_time() - cpu


@torch.no_grad()
def throughput(name: str, model: torch.nn.Module, hf: torch.nn.Module, batch: int,
               args: argparse.Namespace, device: torch.device) -> str:
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(batch)).to(device)
    n = args.new_tokens
    generate(model, prompt[:, :8], 2, temperature=0.0)  # warm-up (allocator, kernels)
    t_ours, ours, cpu_ours = timed(lambda: generate(model, prompt, n, temperature=0.0), device)
    mask = torch.ones_like(prompt)
    t_hf, theirs, cpu_hf = timed(lambda: hf.generate(
        input_ids=prompt, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=n,
        min_new_tokens=n, pad_token_id=0), device)
    k = args.uncached_tokens
    t_unc, _, _ = timed(lambda: generate(model, prompt, k, temperature=0.0, use_cache=False), device)
    same = int((ours[:, args.prompt_len:] == theirs[:, args.prompt_len:]).all(0).int()
               .cumprod(0).sum())
    rate_ours, rate_hf, rate_unc = batch * n / t_ours, batch * n / t_hf, batch * k / t_unc
    return (f"| {name} | {batch} | {rate_ours:,.1f} | {rate_hf:,.1f} | "
            f"{rate_ours / rate_hf:.2f} | {cpu_hf / cpu_ours:.2f} | {rate_unc:,.2f} ({k} tokens) | "
            f"{rate_ours / rate_unc:.1f} | {same}/{n} |")


@torch.no_grad()
def per_token(name: str, model: torch.nn.Module, args: argparse.Namespace,
              device: torch.device, steps: int = 16, uncached_steps: int = 3) -> str:
    T = args.context
    ids = torch.randint(0, model.config.vocab_size, (1, T + steps),
                        generator=torch.Generator().manual_seed(0)).to(device)
    cache = model.new_cache(1, T + steps)
    model(ids[:, :T], cache=cache)
    t_cached, _, _ = timed(lambda: [model(ids[:, T + i:T + i + 1], cache=cache)
                                 for i in range(steps)], device)
    t_uncached, _, _ = timed(lambda: [model(ids[:, :T + i + 1]) for i in range(uncached_steps)],
                          device)
    cached_ms, uncached_ms = 1e3 * t_cached / steps, 1e3 * t_uncached / uncached_steps
    return (f"| {name} | {T} | {cached_ms:.1f} | {uncached_ms:.1f} | "
            f"{uncached_ms / cached_ms:.1f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 16],
                   help="none: only the per-token table")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--uncached-tokens", type=int, default=8)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import transformers

    when = datetime.datetime.now(datetime.UTC)
    print(f"# {when:%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
          f", transformers {transformers.__version__}, device {device}, load {os.getloadavg()}")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, fp32\n")
    if args.batch_sizes:
        print("| model | batch | megatrain cached tok/s | transformers tok/s | ratio (wall) | "
              "ratio (CPU-s) | megatrain uncached tok/s | cached / uncached | same tokens |")
        print("|---|---|---|---|---|---|---|---|---|")
    built = {}
    for name in args.models:
        built[name] = build(name, device)
        for batch in args.batch_sizes:
            print(throughput(name, *built[name], batch, args, device), flush=True)
    print("\n| model | context | cached ms/token | uncached ms/token | speed-up |")
    print("|---|---|---|---|---|")
    for name in args.models:
        print(per_token(name, built[name][0], args, device), flush=True)
    print(f"# done, load {os.getloadavg()}")


if __name__ == "__main__":
    main()
