"""SkippableAdamW's own clipping (fp32 ZeRO 0): the update torch's clip_grad_norm_ + AdamW make."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megatrain.config.schema import Config
from megatrain.training.engine import SkippableAdamW, clips_itself, deepspeed_config


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 3.0  # a norm well above the clip
    return model


def _reference(clip: float) -> nn.Module:
    model = _model(0)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    torch.optim.AdamW(model.parameters(), lr=0.1, fused=True).step()
    return model


@pytest.mark.parametrize("handed_norm", [False, True])
def test_clip_then_step_equals_clip_grad_norm_and_adamw(handed_norm: bool) -> None:
    """With the norm handed over by the trainer or measured in ``step``, the weights after one
    step equal torch's clip_grad_norm_ followed by AdamW, exactly; the handed norm is consumed."""
    model = _model(0)
    optimizer = SkippableAdamW(model.parameters(), lr=0.1, fused=True)
    optimizer.clip_norm = 0.5
    if handed_norm:
        optimizer.grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters()])
    optimizer.step()
    assert optimizer.grad_norm is None
    for ours, ref in zip(model.parameters(), _reference(0.5).parameters(), strict=True):
        assert torch.equal(ours, ref)


def test_a_skipped_step_leaves_weights_and_drops_the_handed_norm() -> None:
    model = _model(0)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = SkippableAdamW(model.parameters(), lr=0.1, fused=True)
    optimizer.clip_norm, optimizer.skip_next = 0.5, True
    optimizer.grad_norm = torch.tensor(float("nan"))
    optimizer.step()
    assert optimizer.grad_norm is None and not optimizer.state
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("zero_stage, precision, ours", [
    (0, "fp32", True), (0, "bf16", False), (1, "fp32", False), (3, "fp32", False)])
def test_deepspeed_clips_everywhere_but_fp32_zero0(zero_stage: int, precision: str,
                                                    ours: bool) -> None:
    cfg = Config()
    cfg.deepspeed.zero_stage = zero_stage
    assert clips_itself(zero_stage, precision) is ours
    clip = deepspeed_config(cfg, precision, world_size=1)["gradient_clipping"]
    assert clip == (0.0 if ours else cfg.trainer.grad_clip)


def test_the_engine_of_fp32_zero0_clips_in_our_optimizer(one_rank: None) -> None:
    """initialize_engine with a default Config (fp32, ZeRO 0, one rank) hands the clip to
    SkippableAdamW and turns off DeepSpeed's all-reduce; one engine.backward + engine.step
    equals torch's clip_grad_norm_ + AdamW (the engine's groups and learning rates) on a copy."""
    import copy

    from megatrain.training.engine import initialize_engine

    cfg = Config()
    assert (cfg.deepspeed.zero_stage, cfg.trainer.grad_clip) == (0, 1.0)
    model = _model(0)
    for p in model.parameters():
        p.grad = None  # gradients from the backward only
    reference, start = copy.deepcopy(model), copy.deepcopy(model)
    engine, optimizer = initialize_engine(model, cfg, "fp32", 1, torch.device("cpu"))
    assert optimizer.clip_norm == cfg.trainer.grad_clip
    assert engine.enable_backward_allreduce is False

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    engine.backward(engine(x).square().sum() * 100.0)  # a gradient norm far above the clip
    own = dict(reference.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [own[names[id(p)]] for p in g["params"]]}
              for g in optimizer.param_groups]  # the learning rates of this step
    reference(x).square().sum().mul(100.0).backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.trainer.grad_clip)
    assert norm > 10 * cfg.trainer.grad_clip
    adamw = torch.optim.AdamW(groups, fused=True)
    adamw.step()
    engine.step()
    for name, ref in reference.named_parameters():
        ours = model.get_parameter(name)
        assert not torch.equal(ref, start.get_parameter(name)), name  # a real update
        assert torch.equal(ours, ref), name
        # Adam's first step hardly depends on the gradient's scale; its moments show the clip
        assert torch.equal(optimizer.state[ours]["exp_avg"], adamw.state[ref]["exp_avg"]), name
