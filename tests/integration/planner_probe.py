"""Measure what DeepSpeed really holds, for the memory planner's test (run under torchrun).

    python -m torch.distributed.run --nproc_per_node 2 -m tests.integration.planner_probe \
        CASES.json OUT_DIR

CASES.json maps a case name to Hydra overrides. For each case, in the same processes (DeepSpeed
is imported once), a fresh model is wrapped by ``initialize_engine`` and trained for one step on
random tokens; OUT_DIR/rank<R>.json gets, per case, the bytes of the distinct storages behind:

- parameters: the module's parameters and, under ZeRO-3, their partitions (``p.ds_tensor``);
- optimizer: the base optimizer's state tensors and the tensors it steps (fp32 master copies)
  when they are not the module's own parameters;
- gradients: ``.grad`` (and ``.grad_accum``) of both, DeepSpeed's ``averaged_gradients``, its
  stage 1-2 ``grads_in_partition`` and stage 3 ``grad_partitions_flat_buffer`` — the most held at
  any of: after each backward, and at each call of the base optimizer's ``step``;
- buffers: the reduce buckets and offload staging buffers;
- unattributed: every other tensor storage created since the case started that is alive at the
  first optimizer step (when the most is held): what the categories above would have missed.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BUFFER_ATTRS = ("temp_grad_buffer_for_cpu_offload", "temp_grad_buffer_for_gpu_offload",
                "param_buffer_of_bit16_for_cpu_offload_groups", "inf_or_nan_tracker")
GRAD_ATTRS = ("grads_in_partition", "grad_partitions_flat_buffer", "accumulated_grads_in_cpu")
# DeepSpeed steps its base optimizer one group at a time with ``param_groups`` swapped to that
# group, so the tensors it steps are also found where each wrapper keeps them.
MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups")


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors in ``obj``: a tensor, or nested dicts / lists / tuples of them."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)
    elif hasattr(obj, "flat_partition"):  # DeepSpeed's GradPartitionBufferGroup
        yield from _tensors(obj.flat_partition)


def _storages(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """{storage address: bytes} of the distinct non-empty storages behind ``tensors``."""
    out = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        if storage.nbytes():
            out[storage.data_ptr()] = storage.nbytes()
    return out


def _live_tensors() -> list[torch.Tensor]:
    """Tensors created since ``gc.freeze()`` that are still reachable (cheap: the frozen
    objects are neither collected nor listed)."""
    gc.collect()  # unreachable cycles still holding tensors would look like allocations
    found = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                found.append(obj)
        except ReferenceError:  # a dead weak proxy
            continue
    return found


class Probe:
    """Where one engine keeps its bytes, by category."""

    def __init__(self, engine: Any, base: torch.optim.Optimizer) -> None:
        self.engine, self.base, self.ds = engine, base, engine.optimizer
        self.peak_grads: dict[int, int] = {}
        self.unattributed = 0
        self.checked = False
        self.rescans = 0
        self.missed: list[tuple[int, str]] = []

    def params(self) -> dict[int, int]:
        ps = list(self.engine.module.parameters())
        return _storages([p.data for p in ps] + [getattr(p, "ds_tensor", None) for p in ps])

    def stepped(self) -> list[torch.Tensor]:
        """The tensors the base optimizer updates: the model's or DeepSpeed's fp32 masters."""
        found = [p for g in self.base.param_groups for p in g["params"]] + list(self.base.state)
        for attr in MASTER_ATTRS:
            found += _tensors(getattr(self.ds, attr, None))
        return found

    def optimizer(self) -> dict[int, int]:
        state = _storages(_tensors(list(self.base.state.values())))
        own = self.params()
        masters = {k: v for k, v in _storages(self.stepped()).items() if k not in own}
        return state | masters

    def grads(self) -> dict[int, int]:
        ps = list(self.engine.module.parameters())
        found = [p.grad for p in ps + self.stepped()] + [getattr(p, "grad_accum", None)
                                                          for p in ps]
        found += _tensors(getattr(self.ds, "averaged_gradients", {}))
        for attr in GRAD_ATTRS:
            found += _tensors(getattr(self.ds, attr, None))
        return _storages(found)

    def buffers(self) -> dict[int, int]:
        found = []
        for bucket in getattr(self.ds, "ipg_buckets", {}).values():
            found += _tensors(bucket.buffer)
        for attr in BUFFER_ATTRS:
            found += _tensors(getattr(self.ds, attr, None))
        return _storages(found)

    def snapshot(self, check: bool = False) -> None:
        """Gradients now (keep the most seen); with ``check``, also what no category explains
        (a garbage-collector scan: slow, so once per case, when the most is held)."""
        grads = self.grads()
        if sum(grads.values()) > sum(self.peak_grads.values()):
            self.peak_grads = grads
        if check:
            self._check(grads)

    def _check(self, grads: dict[int, int]) -> None:
        """What no category explains. Now and then a transient (stage 0's all-reduce buffer was
        seen) is still alive here — perhaps released late by a collective's worker thread — so a
        surplus is re-scanned a few times: what is really held stays."""
        known = self.params() | self.optimizer() | grads | self.buffers()
        for rescan in range(5):
            self.rescans = rescan
            missed = {}
            for t in _live_tensors():
                key = next(iter(_storages([t])), None)
                if key is not None and key not in known:
                    missed[key] = (t.untyped_storage().nbytes(), f"{tuple(t.shape)} {t.dtype}")
            self.unattributed = sum(n for n, _ in missed.values())
            self.missed = sorted(missed.values(), reverse=True)[:3]
            if self.unattributed < 1000:
                break
            time.sleep(0.2)
        self.checked = True

    def report(self) -> dict[str, Any]:
        return {"parameters": sum(self.params().values()),
                "gradients": sum(self.peak_grads.values()),
                "optimizer": sum(self.optimizer().values()),
                "buffers": sum(self.buffers().values()),
                "unattributed": self.unattributed, "unattributed_largest": self.missed,
                "rescans": self.rescans}


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_module

    from megatrain.config import register_configs

    register_configs()
    with initialize_config_module("megatrain.configs", version_base=None):
        return compose("config", overrides=overrides)


def run_case(overrides: list[str], world_size: int, device: torch.device) -> dict[str, Any]:
    """One engine, one optimizer step on random tokens; what it held."""
    from megatrain.models.registry import get_model_spec, resolve_model_config
    from megatrain.training.engine import initialize_engine

    cfg = _compose(overrides)
    gc.freeze()  # what exists now is not this case's
    precision = cfg.trainer.precision
    config = resolve_model_config(cfg.model, cfg.model.vocab_size or cfg.data.vocab_size)
    torch.manual_seed(cfg.trainer.seed)
    dtype = {"bf16": torch.bfloat16}.get(precision, torch.float32)
    model = get_model_spec(cfg.model.family).build(config, device, dtype)
    engine, base = initialize_engine(model, cfg, precision, world_size, device)
    probe = Probe(engine, base)
    base.register_step_pre_hook(lambda *_: probe.snapshot(check=not probe.checked))
    B, T = cfg.trainer.micro_batch_size, cfg.data.seq_len
    for _ in range(cfg.trainer.grad_accum_steps):
        ids = torch.randint(0, config.vocab_size, (B, T + 1), device=device)
        logits = engine(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        engine.backward(loss)
        del logits, loss, ids
        probe.snapshot()
        engine.step()
    report = probe.report()
    gc.unfreeze()
    return report


def main() -> None:
    from megatrain.distributed import detect_world, init_distributed, shutdown_distributed
    from megatrain.metrics import setup_console_logging

    cases = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    world = detect_world()
    setup_console_logging(world.rank)
    device = init_distributed(world)
    results = {name: run_case(overrides, world.world_size, device)
               for name, overrides in cases.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{world.rank}.json").write_text(json.dumps(results, indent=1))
    shutdown_distributed()


if __name__ == "__main__":
    main()
