"""Count host–device syncs in the training hot path (a real in-process Trainer, one rank).

    python -m tests.sync_probe OUT.json OVERRIDE ...

Builds the Trainer as ``megatrain-train`` does, runs ``WARMUP`` steps (compilation, allocator,
the first log), then ``STEPS`` more that are neither log, eval nor save steps, and writes
{"reads": [...], "cuda_syncs": N}:

- ``reads``: every ``Tensor.item`` / ``tolist`` / ``__bool__`` / ``__float__`` / ``__int__`` /
  ``__index__`` call on a tensor of the training device during those steps (on a CPU run, every
  such call except on the loader's own host batches), as "file:line function" of the first
  caller outside torch: on a GPU each is a sync;
- ``cuda_syncs``: on CUDA, the synchronising operations ``torch.cuda.set_sync_debug_mode("warn")``
  reported over the same steps.

tests/integration/test_sync_free_steps.py runs it on a CPU, tests/gpu/test_fast_paths_gpu.py on
a GPU.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

WARMUP, STEPS = 3, 4
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def _caller() -> str:
    """The first frame outside torch and this file: who asked for the value."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename.replace("\\", "/")
        if "/torch/" not in name and not name.endswith("sync_probe.py"):
            return f"{'/'.join(name.split('/')[-3:])}:{frame.lineno} {frame.name}"
    return "?"


@contextlib.contextmanager
def count_reads(host: set[int], device: torch.device) -> Iterator[list[str]]:
    """Patch the tensor methods that read a value back to the host. On a GPU, reads of CUDA
    tensors count; on a CPU, reads of every tensor but ``host`` (ids of tensors that live on
    the host by design: the loader's batches, the optimizer's step counters)."""
    found: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def patched(name: str) -> Any:
        original = originals[name]

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            on_device = self.is_cuda if device.type == "cuda" else id(self) not in host
            if on_device and not torch._C._is_torch_function_mode_enabled():
                found.append(f"{name} at {_caller()}")
            return original(self, *args, **kwargs)
        return read

    for name in READS:
        setattr(torch.Tensor, name, patched(name))
    try:
        yield found
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class HostBatches:
    """The stream's batches, remembering each one's tensors (and what they derive on the host
    for the loss weights) as host tensors. Every batch handed out is kept alive: a freed
    tensor's id is soon another tensor's (the next step's loss), whose reads would be skipped."""

    def __init__(self, batches: Iterator[dict[str, torch.Tensor]], host: set[int],
                 device: torch.device) -> None:
        self.batches, self.host, self.device = batches, host, device
        self.kept: list[dict[str, torch.Tensor]] = []

    def __iter__(self) -> HostBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self.batches)
        if self.device.type == "cpu":  # on a GPU host tensors are told apart by their device
            self.kept.append(batch)
            self.host.update(id(t) for t in batch.values() if isinstance(t, torch.Tensor))
        return batch


def main(out: str, overrides: list[str]) -> int:
    from megatrain.config.compose import compose_config
    from megatrain.distributed import detect_world, init_distributed

    cfg = compose_config(overrides)
    world = detect_world()
    device = init_distributed(world, cfg.trainer.collective_timeout_s)
    from megatrain.training.trainer import Trainer

    Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)  # run_training makes it
    trainer = Trainer(cfg, world, device)
    host: set[int] = set()
    batches = HostBatches(iter(trainer.stream), host, device)
    for _ in range(WARMUP):
        trainer.train_step(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    host.update(id(s["step"]) for s in trainer.optimizer.state.values()
                if isinstance(s.get("step"), torch.Tensor) and not s["step"].is_cuda)
    host_reads = _host_derived_reads(trainer)
    with warnings.catch_warnings(record=True) as caught, count_reads(host, device) as reads:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        for _ in range(STEPS):
            trainer.train_step(batches, measure_grad_norm=False)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    syncs = [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message)]
    reads = [r for r in reads if r.rsplit(" ", 1)[0] not in host_reads]
    Path(out).write_text(json.dumps({"reads": reads, "cuda_syncs": len(syncs),
                                     "sync_messages": syncs[:20], "device": str(device)}))
    print(json.dumps({"reads": reads, "cuda_syncs": len(syncs)}, indent=1))
    return 0


def _host_derived_reads(trainer: Any) -> set[str]:
    """Reads of values computed on the host from host batches (``_token_weights``' label
    counts): on a CPU run they cannot be told from device tensors by their device, so they are
    named here and left out. On a GPU they are host tensors and never counted."""
    return {f"__int__ at megatrain/training/trainer.py:{line}"
            for line in _lines_of(trainer._token_weights, "int(")}


def _lines_of(fn: Any, text: str) -> list[int]:
    import inspect

    lines, start = inspect.getsourcelines(fn)
    return [start + i for i, line in enumerate(lines) if text in line]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
