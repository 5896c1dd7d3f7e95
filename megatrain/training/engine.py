"""The DeepSpeed engine: its config built from ours, and ``deepspeed.initialize``.

We build the optimizer and the LR schedule ourselves (torch AdamW, fused on CUDA) and hand them
to DeepSpeed, which wraps them for ZeRO, mixed precision, clipping and accumulation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from megatrain.errors import ConfigError
from megatrain.training.schedule import lr_multiplier

log = logging.getLogger("megatrain")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on a GPU that supports it, else fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("trainer.precision=fp16 needs a GPU; on a CPU use fp32 or bf16")
    return precision


def deepspeed_config(cfg: Any, precision: str, world_size: int) -> dict[str, Any]:
    """Translate the Hydra config into DeepSpeed's JSON config."""
    t = cfg.trainer
    stage = cfg.deepspeed.zero_stage
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={stage} is not one of 0, 1, 2, 3")
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: nn.Module, cfg: Any, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases and norm gains)."""
    o = cfg.optim
    if o.name != "adamw":
        raise ConfigError(f"optim.name={o.name!r} is not supported; valid: adamw")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             fused=device.type == "cuda")


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Any) -> torch.optim.lr_scheduler.LambdaLR:
    s = cfg.schedule
    total = s.total_steps or cfg.trainer.max_steps
    fn = lr_multiplier(s.decay, s.warmup_steps, total, s.min_lr_ratio, s.wsd_decay_fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def initialize_engine(model: nn.Module, cfg: Any, precision: str, world_size: int,
                      device: torch.device) -> Any:
    """Wrap ``model`` in a DeepSpeed engine with our optimizer and schedule."""
    import deepspeed

    optimizer = build_optimizer(model, cfg, device)
    schedule = build_schedule(optimizer, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule,
        config=deepspeed_config(cfg, precision, world_size))
    log.info("deepspeed: ZeRO stage %d, %s, %d rank(s)", cfg.deepspeed.zero_stage, precision,
             world_size)
    return engine
