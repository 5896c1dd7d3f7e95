"""The DeepSpeed engine: its config built from ours, and ``deepspeed.initialize``.

We build the optimizer and the LR schedule ourselves (torch AdamW, fused on CUDA) and hand them
to DeepSpeed, which wraps them for ZeRO, mixed precision, clipping and accumulation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatrain.config.schema import Config, DeepSpeedConfig, FinetuneConfig
from megatrain.config.validate import DEVICE_CHOSEN_PRECISIONS, PRECISIONS, check_engine_setup
from megatrain.errors import ConfigError
from megatrain.training.finetune import (
    FinetunePlan,
    Finetuning,
    describe,
    finetune_plan,
    frozen_groups_skipped,
)
from megatrain.training.schedule import lr_multiplier_of

log = logging.getLogger("megatrain")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on a GPU that supports it, else fp32; ``bf16_if_native`` → that, and bf16
    on a CPU that multiplies bf16 natively too (:func:`cpu_has_native_bf16`)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision in DEVICE_CHOSEN_PRECISIONS:
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        if precision == "auto":
            return "fp32"
        native = cpu_has_native_bf16()
        log.info("trainer.precision=bf16_if_native: %s", "bf16 (the CPU has AVX512-BF16 or "
                 "AMX-BF16)" if native else "fp32 (bf16 would be emulated on this CPU)")
        return "bf16" if native else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("trainer.precision=fp16 needs a GPU; on a CPU use fp32 or bf16")
    return precision


# x86 CPU flags of a native bf16 matmul. Without them PyTorch emulates bf16 on the CPU: a small
# GPT's step took 2x (AVX-512 without BF16) to 12x (AVX2) as long as in fp32 (docs/benchmarks.md).
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this (Linux, x86) CPU multiplies bf16 natively; False where it cannot be told."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(NATIVE_BF16_CPU_FLAGS & set(line.partition(":")[2].split()))
    return False


def _zero_config(ds: DeepSpeedConfig) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 0:
        return zero
    zero.update(overlap_comm=ds.overlap_comm, contiguous_gradients=True,
                reduce_bucket_size=ds.reduce_bucket_size)
    if ds.zero_stage < 3:
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    else:
        zero["stage3_prefetch_bucket_size"] = ds.stage3_prefetch_bucket_size
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def deepspeed_config(cfg: Config, precision: str, world_size: int,
                     load_universal: bool = False) -> dict[str, Any]:
    """Translate our config into DeepSpeed's JSON config; ``load_universal`` when the run
    resumes from a universal checkpoint (another world size or ZeRO stage)."""
    t, ds = cfg.trainer, cfg.deepspeed
    check_engine_setup(ds.zero_stage, ds.offload_optimizer, ds.offload_param, precision)
    return {
        "checkpoint": {"load_universal": load_universal},
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        # fp32 ZeRO-0: SkippableAdamW clips (DeepSpeed's clip takes one norm per parameter and
        # all-reduces their sum every step).
        "gradient_clipping": 0.0 if clips_itself(ds.zero_stage, precision) else t.grad_clip,
        "zero_optimization": _zero_config(ds),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": ds.initial_scale_power,
                 "loss_scale_window": ds.loss_scale_window, "min_loss_scale": ds.min_loss_scale},
        "zero_allow_untested_optimizer": True,
        # Our AdamW (fused on CUDA) also steps offloaded CPU partitions; DeepSpeedCPUAdam would
        # need a JIT-compiled op.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def clips_itself(zero_stage: int, precision: str) -> bool:
    """Whether the optimizer clips the gradients rather than DeepSpeed: fp32 under ZeRO 0, the
    one setup where DeepSpeed clips with its generic per-parameter norm (mixed precision and
    ZeRO 1-3 clip inside DeepSpeed's own optimizers)."""
    return zero_stage == 0 and precision == "fp32"


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next ``step()`` can be made a no-op (``skip_next``): every DeepSpeed path
    (ZeRO 0-3, bf16, offload) ends in this step, so skipping here skips the update exactly —
    weights, moments and step counts untouched — whatever wraps it. For the same reason groups
    flagged ``frozen`` (``finetune.*``) are left out here: see ``training/finetune.py``.

    With ``clip_norm`` (fp32 ZeRO 0, :func:`clips_itself`) it clips the gradients to that global
    norm first, as ``torch.nn.utils.clip_grad_norm_`` does, on the device: with ``grad_norm``
    when the trainer measured it for this step already (it is consumed), else measured here."""

    skip_next = False
    finetune: Finetuning | None = None  # set by ``initialize_engine``
    clip_norm = 0.0
    grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        norm, self.grad_norm = self.grad_norm, None
        if self.skip_next:
            return None
        if self.clip_norm:
            self._clip(norm)
        with frozen_groups_skipped(self):
            return super().step(closure)

    def _clip(self, norm: torch.Tensor | None) -> None:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        if norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, self.clip_norm, norm)


def _finetune_plan(model: nn.Module, cfg: Config) -> FinetunePlan:
    return finetune_plan(model, getattr(cfg, "finetune", None) or FinetuneConfig())


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device,
                    plan: FinetunePlan | None = None) -> SkippableAdamW:
    """AdamW; weight decay on matrices only (not on biases and norm gains). Its groups are the
    fine-tuning plan's (``finetune.*``): by default one of matrices and one of the rest."""
    o = cfg.optim
    if o.name != "adamw":
        raise ConfigError(f"optim.name={o.name!r} is not supported; valid: adamw")
    plan = plan or _finetune_plan(model, cfg)
    # fused: one kernel for all parameters, on CUDA and on the CPU alike (the CPU kernel steps
    # nanoGPT's baby GPT in a fifth of the per-parameter loop's time: docs/benchmarks.md)
    return SkippableAdamW(plan.optimizer_groups(o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                          eps=o.eps, fused=True)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Config,
                   plan: FinetunePlan | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule; with a fine-tuning plan one lambda per group (its layer-decay scale,
    0 while frozen)."""
    multiplier = lr_multiplier_of(cfg)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, multiplier if plan is None else plan.lr_lambdas(multiplier))


def initialize_engine(model: nn.Module, cfg: Config, precision: str, world_size: int,
                      device: torch.device,
                      load_universal: bool = False) -> tuple[Any, SkippableAdamW]:
    """Wrap ``model`` in a DeepSpeed engine with our optimizer and schedule: (engine, optimizer)."""
    import deepspeed

    config = deepspeed_config(cfg, precision, world_size, load_universal)  # refuses bad ones first
    plan = _finetune_plan(model, cfg)  # before ZeRO-3 partitions the parameters
    optimizer = build_optimizer(model, cfg, device, plan)
    schedule = build_schedule(optimizer, cfg, plan)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=schedule, config=config)
    optimizer.finetune = Finetuning(plan, optimizer)
    if clips_itself(cfg.deepspeed.zero_stage, precision):
        optimizer.clip_norm = cfg.trainer.grad_clip
    if world_size == 1 and cfg.deepspeed.zero_stage == 0:
        # One rank has no gradients to average: DeepSpeed would still flatten, all-reduce and
        # copy them back after every backward.
        engine.enable_backward_allreduce = False
    summary = describe(plan)
    if summary:
        log.info("%s", summary)
    ds = cfg.deepspeed
    log.info("deepspeed: ZeRO stage %d%s%s, %s, %d rank(s)", ds.zero_stage,
             ", optimizer offload" if ds.offload_optimizer else "",
             ", parameter offload" if ds.offload_param else "", precision, world_size)
    return engine, optimizer
