"""Staged and layer-wise fine-tuning (megatrain/training/finetune.py), in process: depths of
every family's parameters, selections, stages, layer-decay factors, the per-group LR lambdas,
bad input, and freezing checked against real freezing (``requires_grad=False`` on the frozen
parameters, a fresh AdamW group for them when they start to train)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from megatrain.config.schema import Config, FinetuneConfig
from megatrain.errors import ConfigError
from megatrain.models.registry import get_model_spec, resolve_model_config
from megatrain.training.engine import SkippableAdamW, build_optimizer, build_schedule
from megatrain.training.finetune import (
    Finetuning,
    finetune_plan,
    fresh_adam_state,
    layer_scales,
    parameter_depths,
    parse_stages,
    select,
)
from megatrain.training.schedule import lr_multiplier_of

SIZES = {"gpt": "gpt2-tiny", "llama": "llama-tiny", "bert": "bert-tiny", "t5": "t5-tiny"}


def _model(family: str, **dims: int) -> nn.Module:
    config = resolve_model_config({"family": family, "size": SIZES[family], **dims}, 100)
    torch.manual_seed(0)
    return get_model_spec(family).build(config, "cpu", torch.float32)


def _ft(**values: object) -> FinetuneConfig:
    return dataclasses.replace(FinetuneConfig(), **values)


# --- depths -----------------------------------------------------------------------------------

EXPECTED = {  # 4 blocks (T5: 2 + 2): embeddings 0, block i -> i + 1, the rest L + 1
    "gpt": {"tok_emb.weight": 0, "pos_emb.weight": 0, "blocks.0.ln_1.weight": 1,
            "blocks.2.attn.qkv.bias": 3, "blocks.3.mlp.proj.weight": 4, "ln_f.bias": 5},
    "llama": {"tok_emb.weight": 0, "blocks.0.mlp.gate.weight": 1, "blocks.3.ln_2.weight": 4,
              "ln_f.weight": 5, "lm_head.weight": 5},
    "bert": {"tok_emb.weight": 0, "pos_emb.weight": 0, "type_emb.weight": 0, "emb_ln.bias": 0,
             "blocks.1.attn.proj.weight": 2, "blocks.3.ln_2.bias": 4, "head.dense.weight": 5,
             "head.ln.weight": 5, "head.decoder.bias": 5},
    "t5": {"tok_emb.weight": 0, "encoder.rel_bias.weight": 1, "encoder.blocks.0.attn.qkv.weight": 1,
           "encoder.blocks.1.mlp.fc.weight": 2, "encoder.ln_f.weight": 3,
           "decoder.rel_bias.weight": 1, "decoder.blocks.0.cross_attn.kv.weight": 1,
           "decoder.blocks.1.ln_3.weight": 2, "decoder.ln_f.weight": 3, "lm_head.weight": 3},
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_every_parameter_has_its_depth(family: str) -> None:
    model = _model(family)
    depths = parameter_depths(model)
    assert depths.top == (3 if family == "t5" else 5)
    assert set(depths.of) == {name for name, _ in model.named_parameters()}
    for name, depth in EXPECTED[family].items():
        assert depths.of[name] == depth, name
    for name, depth in depths.of.items():  # every block parameter: its index + 1
        if ".blocks." in f".{name}":
            index = int(name.split("blocks.")[1].split(".")[0])
            assert depth == index + 1, name


def test_a_tied_output_matrix_is_an_embedding_known_by_both_names() -> None:
    depths = parameter_depths(_model("gpt"))
    assert "lm_head.weight" not in depths.of  # the same tensor as tok_emb.weight
    assert depths.aliases["tok_emb.weight"] == ("tok_emb.weight", "lm_head.weight")
    assert select("lm_head.weight", depths) == {"tok_emb.weight"}
    assert select("head", depths) == {"ln_f.weight", "ln_f.bias"}  # GPT-2's head: ln_f alone


def test_t5_stacks_of_different_depths_are_aligned_at_the_top() -> None:
    depths = parameter_depths(_model("t5", n_layers=4, n_decoder_layers=2))
    assert depths.top == 5
    assert depths.of["encoder.blocks.0.ln_1.weight"] == 1
    assert depths.of["encoder.blocks.3.ln_1.weight"] == 4
    assert depths.of["decoder.rel_bias.weight"] == 3  # with the decoder's first block
    assert depths.of["decoder.blocks.0.ln_1.weight"] == 3
    assert depths.of["decoder.blocks.1.ln_1.weight"] == 4
    top1 = select("top:1", depths)
    assert {n.split(".blocks.")[0] for n in top1 if ".blocks." in n} == {"encoder", "decoder"}
    assert all(".blocks.3." in n or ".blocks.1." in n or depths.of[n] == 5 for n in top1)


@pytest.mark.parametrize("heads", [{"num_labels": 3}, {"nsp": True}])
def test_bert_task_heads_are_the_head(heads: dict) -> None:
    """The classifier (pooler + classifier) and NSP (pooler + nsp head) layouts."""
    config = resolve_model_config({"family": "bert", "size": "bert-tiny"}, 100)
    if not all(hasattr(config, key) for key in heads):
        pytest.skip("this BERT has no task heads")
    model = get_model_spec("bert").build(dataclasses.replace(config, **heads), "cpu",
                                         torch.float32)
    depths = parameter_depths(model)
    head = select("head", depths)
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= head
    assert head == {n for n in depths.of if not n.startswith(("blocks.", *EMBEDDING_NAMES))}
    assert {n for n in head if n.startswith(("classifier.", "nsp"))}


EMBEDDING_NAMES = ("tok_emb.", "pos_emb.", "type_emb.", "emb_ln.")


def test_heads_added_around_a_body_sit_on_top() -> None:
    """A classifier wrapping a body (the layout a task head may take) needs no change here."""

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = _model("bert")
            self.pooler = nn.Linear(128, 128)
            self.classifier = nn.Linear(128, 3)

    depths = parameter_depths(Classifier())
    assert depths.of["bert.tok_emb.weight"] == 0
    assert depths.of["bert.blocks.3.mlp.fc.weight"] == 4
    assert depths.of["pooler.weight"] == depths.of["classifier.bias"] == 5
    assert select("head", depths) >= {"pooler.weight", "classifier.weight", "bert.head.ln.bias"}


# --- selections and stages --------------------------------------------------------------------


def test_selections() -> None:
    depths = parameter_depths(_model("llama"))
    names = set(depths.of)
    assert select("all", depths) == names
    assert select("head", depths) == select("top:0", depths) == {"ln_f.weight", "lm_head.weight"}
    top2 = select("top:2", depths)
    assert top2 == {n for n in names if n.startswith(("blocks.2.", "blocks.3.", "ln_f", "lm_"))}
    assert select("top:4", depths) == names - {"tok_emb.weight"}
    assert select("blocks.1.*, lm_head.*", depths) == \
        {n for n in names if n.startswith("blocks.1.")} | {"lm_head.weight"}
    assert select("head,blocks.0.ln_?.weight", depths) == \
        {"ln_f.weight", "lm_head.weight", "blocks.0.ln_1.weight", "blocks.0.ln_2.weight"}


@pytest.mark.parametrize("trainable, message", [
    ("top:5", "finetune.trainable='top:5': top:5 needs top:N with N a whole number from 0 to 4"),
    ("top:x", "top:x needs top:N with N a whole number from 0 to 4"),
    ("top:-1", "top:-1 needs top:N"),
    ("Head", "'Head' is not all, head or top:N and matches no parameter name"),
    ("head,blocks.9.*", "'blocks.9.*' is not all, head or top:N and matches no parameter name"),
    ("head,", "finetune.trainable='head,' has an empty entry"),
    ("", "finetune.trainable='' selects nothing"),
])
def test_bad_selections_say_what_is_wrong(trainable: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        finetune_plan(_model("gpt"), _ft(trainable=trainable))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_stages_start_at_cumulative_steps() -> None:
    stages = parse_stages(_ft(stages=[{"steps": 300, "trainable": "top:2"},
                                      {"steps": 200, "trainable": "top:4"},
                                      {"trainable": "all"}]))
    assert [(s.start, s.trainable) for s in stages] == [(0, "top:2"), (300, "top:4"), (500, "all")]
    assert stages[1].where == "finetune.stages[1].trainable"
    assert parse_stages(_ft(trainable="head"))[0].where == "finetune.trainable"


@pytest.mark.parametrize("stages, message", [
    ([{"trainable": "top:2"}, {"trainable": "all"}],
     "finetune.stages[0].steps is missing: every stage but the last needs its number of steps"),
    ([{"steps": 0, "trainable": "top:2"}, {"trainable": "all"}],
     "finetune.stages[0].steps=0 must be a whole number >= 1"),
    ([{"steps": 3, "trainable": "top:2"}, {"trainable": "top:9"}],
     "finetune.stages[1].trainable='top:9': top:9 needs top:N"),
    ([{"steps": 3, "train": "all"}], "finetune.stages[0].train is not a stage setting"),
    ([{"steps": 3}], "finetune.stages[0].trainable is missing"),
    (["all"], "finetune.stages[0]='all' is not a mapping"),
    ([], "finetune.stages=[] must be a non-empty list"),
])
def test_bad_stages_say_which(stages: list, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        finetune_plan(_model("gpt"), _ft(stages=stages))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_trainable_and_stages_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="finetune.trainable='head' and finetune.stages"):
        parse_stages(_ft(trainable="head", stages=[{"trainable": "all"}]))


# --- groups, layer decay, lambdas -------------------------------------------------------------


def _config(**finetune: object) -> Config:
    cfg = Config()
    cfg.trainer.max_steps, cfg.schedule.warmup_steps = 100, 10
    cfg.finetune = _ft(**finetune)
    return cfg


def test_the_default_keeps_todays_two_groups_and_schedule() -> None:
    model = _model("bert")
    cfg = _config()
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    params = list(model.parameters())
    assert [g["params"] for g in optimizer.param_groups] == [
        [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.optim.weight_decay, 0.0]
    plan = finetune_plan(model, cfg.finetune)
    assert plan.is_default and not plan.freezes
    schedule = build_schedule(optimizer, cfg, plan)
    other = build_optimizer(model, cfg, torch.device("cpu"))
    todays = build_schedule(other, cfg)  # no plan: one lambda, as before fine-tuning existed
    multiplier = lr_multiplier_of(cfg)
    for step in range(100):
        assert [g["lr"] for g in optimizer.param_groups] == [cfg.optim.lr * multiplier(step)] * 2
        for opt, sched in ((optimizer, schedule), (other, todays)):
            opt.step()
            sched.step()
    assert schedule.state_dict() == todays.state_dict()
    assert all("frozen" not in g for g in optimizer.param_groups)
    finetuning = Finetuning(plan, optimizer)
    finetuning.begin_step(0)
    assert not finetuning._hooks and all("frozen" not in g for g in optimizer.param_groups)


def test_layer_decay_scales_each_depth() -> None:
    model = _model("gpt")
    plan = finetune_plan(model, _ft(layer_decay=0.5))
    depths = parameter_depths(model)
    scales = layer_scales(plan)
    assert scales == {name: 0.5 ** (5 - depth) for name, depth in depths.of.items()}
    assert scales["ln_f.weight"] == 1.0 and scales["tok_emb.weight"] == 0.5 ** 5
    # one group per depth and kind (6 depths, the embeddings are matrices only), top first
    assert [(g.depth, g.decays) for g in plan.groups] == [
        (5, False), (4, True), (4, False), (3, True), (3, False), (2, True), (2, False),
        (1, True), (1, False), (0, True)]


def test_groups_are_as_few_as_the_stages_allow() -> None:
    plan = finetune_plan(_model("gpt"), _ft(stages=[{"steps": 2, "trainable": "top:1"},
                                                    {"steps": 2, "trainable": "top:3"},
                                                    {"trainable": "all"}]))
    # (matrices, vectors) x (trains from stage 1, from 2, from 3): embeddings have no vectors
    kinds = [(g.decays, g.trains) for g in plan.groups]
    assert len(kinds) == 6 and set(kinds) == {
        (decays, trains) for decays in (True, False)
        for trains in ((True, True, True), (False, True, True), (False, False, True))}


def test_each_group_lambda_is_schedule_times_scale_zero_while_frozen() -> None:
    model = _model("gpt")
    cfg = _config(stages=[{"steps": 30, "trainable": "top:2"}, {"trainable": "all"}],
                  layer_decay=0.8)
    plan = finetune_plan(model, cfg.finetune)
    multiplier = lr_multiplier_of(cfg)
    lambdas = plan.lr_lambdas(multiplier)
    assert len(lambdas) == len(plan.groups)
    for group, lr_at in zip(plan.groups, lambdas, strict=True):
        assert group.scale == pytest.approx(0.8 ** (5 - group.depth))
        for step in (0, 5, 29, 30, 31, 99):
            trains = group.depth >= 3 or step >= 30
            assert lr_at(step) == (multiplier(step) * group.scale if trains else 0.0), step


# --- freezing: as real freezing -----------------------------------------------------------------


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(step))


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())


def _groups(named: dict[str, nn.Parameter], names: set[str]) -> list[dict]:
    """Today's two groups (matrices decay) of the parameters ``names``, in model order."""
    params = [p for n, p in named.items() if n in names]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def test_frozen_groups_train_as_really_frozen_parameters() -> None:
    """Stage 1 (2 steps) trains the top block and the head, stage 2 everything, with clipping
    on. The reference freezes for real: requires_grad=False below the top, an AdamW over the
    top only, and a fresh group for the rest at stage 2. Frozen weights stay bit-identical; the
    rest match — the global norm saw no frozen gradient, and the first update of an unfrozen
    group bias-corrects from its own step 1 (a group stepped while frozen would not)."""
    cfg = _config(stages=[{"steps": 2, "trainable": "top:1"}, {"trainable": "all"}])
    cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule.decay = 1e-2, 0.1, "constant"
    cfg.schedule.warmup_steps = 0
    ours, ref = _model("gpt", n_layers=2), _model("gpt", n_layers=2)
    start = {n: p.detach().clone() for n, p in ours.named_parameters()}
    plan = finetune_plan(ours, cfg.finetune)
    optimizer = build_optimizer(ours, cfg, torch.device("cpu"), plan)
    schedule = build_schedule(optimizer, cfg, plan)
    finetuning = Finetuning(plan, optimizer)

    top = {n for n in start if n.startswith(("blocks.1.", "ln_f"))}
    named = dict(ref.named_parameters())
    for name, param in named.items():
        param.requires_grad_(name in top)
    reference = torch.optim.AdamW(_groups(named, top), lr=1e-2, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, fused=True)  # build_optimizer's kernel

    for step in range(4):
        if step == 2:  # stage 2: the rest joins, fresh
            for name in set(named) - top:
                named[name].requires_grad_(True)
            for group in _groups(named, set(named) - top):
                reference.add_param_group(group)
        finetuning.begin_step(step)
        for model, opt in ((ours, optimizer), (ref, reference)):
            opt.zero_grad()
            _loss(model, _batch(step)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
        schedule.step()
        if step == 1:
            for name, param in ours.named_parameters():
                assert torch.equal(param, start[name]) == (name not in top), name
    for (name, mine), theirs in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7, msg=name)
    steps = {float(optimizer.state[p]["step"]) for g in optimizer.param_groups
             for p in g["params"]}
    assert steps == {2.0, 4.0}  # the frozen groups counted only their own 2 steps


def test_a_frozen_groups_state_is_what_adamw_would_create() -> None:
    """Frozen groups get AdamW's initial state without a step (DeepSpeed links every group's
    state after the first step, and universal checkpoints carry it)."""
    param = nn.Parameter(torch.randn(3, 4))
    optimizer = SkippableAdamW([{"params": [param], "frozen": True}], lr=1.0)
    param.grad = torch.ones_like(param)
    before = param.detach().clone()
    optimizer.step()
    assert torch.equal(param, before) and param.grad is not None
    ours = optimizer.state[param]
    reference = torch.optim.AdamW([nn.Parameter(torch.randn(3, 4))], lr=0.0)
    reference.param_groups[0]["params"][0].grad = torch.zeros(3, 4)
    reference.step()
    theirs = next(iter(reference.state.values()))
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert (ours[key].dtype, ours[key].device, ours[key].shape) == \
            (value.dtype, value.device, value.shape), key
    assert float(ours["step"]) == 0.0 and not ours["exp_avg"].any()
    assert fresh_adam_state({"amsgrad": True}, param).keys() >= {"max_exp_avg_sq"}
