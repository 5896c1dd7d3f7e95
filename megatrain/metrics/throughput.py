"""Throughput and utilisation figures for the log rows (tokens/s, TFLOP/s, MFU, memory)."""

from __future__ import annotations

import resource
import time

import torch


class Throughput:
    """Tokens/s and MFU over the interval since the last ``report``."""

    def __init__(self, flops_per_token: float, peak_tflops: float | None, world_size: int) -> None:
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def report(self) -> dict[str, float | None]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = self.tokens / elapsed
        tflops = tokens_per_s * self.flops_per_token / 1e12 / self.world_size  # per device
        mfu = tflops / self.peak_tflops if self.peak_tflops else None
        self.reset()
        return {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops, "mfu": mfu}


def memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
