"""Staged and layer-wise fine-tuning (``finetune.*``): which parameters train at each step, and
at what learning rate.

**Depths.** Every parameter has a depth: 0 for the embeddings (``tok_emb``, ``pos_emb``,
``type_emb``, ``emb_ln``), ``i + 1`` for block ``i``, ``L + 1`` for everything above the blocks
(final norms, LM head, MLM / classification / NSP heads, pooler). The rule reads the parameter
names, so a head added later lands at ``L + 1`` without a change here. An encoder–decoder (T5)
has two stacks, each counted from its own bottom and aligned at the top (the encoder's top block
feeds every decoder block through cross-attention, so both top blocks sit just under the head):
``top:2`` trains the top 2 blocks of the encoder *and* of the decoder, both final norms and the
LM head. A stack's shared relative-position bias (``rel_bias``) belongs to its first block, as
Hugging Face stores it. A tied output matrix (GPT-2's LM head, BERT's MLM decoder, tied Llama /
T5) *is* the token embedding: it has depth 0, so ``head`` and ``top:N`` leave it frozen — name
it (``tok_emb.weight`` or ``lm_head.weight``) to train it; ``head`` on GPT-2 is the final norm.

**Selections** (``finetune.trainable``, a stage's ``trainable``): comma-separated terms, the
union of what each selects — ``all``; ``head`` (depth ``L + 1``); ``top:N`` (depths ``>= L + 1 -
N``: the top N blocks and the head, ``0 <= N <= L``); or an ``fnmatch`` pattern, matched against
every name of a parameter (a tied one has two). Layer-wise LR decay (ELECTRA / BEiT): depth ``d``
trains at ``lr · layer_decay^(L + 1 - d)``, the head at ``lr``, the embeddings at
``lr · layer_decay^(L + 1)``.

**Freezing under DeepSpeed.** ZeRO 1–3 flatten and partition the parameters that require grad
when the engine is built, and stages change what trains mid-run, so ``requires_grad`` never
changes here. Instead every parameter stays in the optimizer, in groups of equal (LR scale,
weight decay, trainable-or-not in each stage) — as few as that allows, and the same on every
resume. While a group is frozen:

- its LR lambda is 0 (``LambdaLR``: schedule × layer scale × 0/1, a function of the step only,
  so a resume across a stage boundary is exact);
- a gradient hook replaces its parameters' gradients by zeros, so the global gradient norm
  (clipping, the non-finite check, the log) and the reductions see what real freezing gives;
- the optimizer skips it (``SkippableAdamW.step`` → :func:`frozen_groups_skipped`): AdamW sees
  no gradient, as for a parameter with ``requires_grad=False``, and leaves its weights, moments
  and step count untouched. So frozen weights stay bit-identical, and a group unfrozen later
  starts as a fresh parameter would (bias correction from step 1), or — frozen after training —
  resumes its moments where they were. DeepSpeed's ZeRO 1–2 / bf16 / ZeRO-3 optimizers all end
  in that one ``step`` with our param-group dicts (flattened partitions in ``params``), so the
  ``frozen`` flag on the group dict reaches every path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from megatrain.errors import ConfigError

log = logging.getLogger("megatrain")

EMBEDDINGS = frozenset({"tok_emb", "pos_emb", "type_emb", "emb_ln"})  # depth 0
STACK_SHARED = frozenset({"rel_bias"})  # used by every block of a stack: with its first block
SELECTIONS = "all, head, top:N or fnmatch patterns of parameter names, comma-separated"


# --- depths -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Depths:
    """Each parameter's depth (by its ``named_parameters`` name), ``top`` = L + 1, and every
    name each parameter goes by (a tied one has two)."""

    of: dict[str, int]
    top: int
    aliases: dict[str, tuple[str, ...]]

    @property
    def blocks(self) -> int:
        """L: the blocks of the deepest stack."""
        return self.top - 1


def _place(name: str) -> tuple[str, str, int]:
    """(kind, stack, index) of a parameter name: kind is embedding | block | shared | top."""
    parts = name.split(".")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "blocks" and parts[i + 1].isdigit():
            return "block", ".".join(parts[:i]), int(parts[i + 1])
    if EMBEDDINGS.intersection(parts):
        return "embedding", "", 0
    for i, part in enumerate(parts):
        if part in STACK_SHARED:
            return "shared", ".".join(parts[:i]), 0
    return "top", "", 0


def parameter_depths(model: nn.Module) -> Depths:
    """Depths of ``model``'s parameters (module docstring), from their names alone."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    places = {names[0]: _place(names[0]) for names in aliases.values()}
    stacks: dict[str, int] = {}
    for kind, stack, index in places.values():
        if kind == "block":
            stacks[stack] = max(stacks.get(stack, 0), index + 1)
    top = max(stacks.values(), default=0) + 1
    depths = {}
    for name, (kind, stack, index) in places.items():
        below = top - 1 - stacks.get(stack, 0)  # a shorter stack is aligned at the top
        depths[name] = {"embedding": 0, "top": top, "block": below + index + 1,
                        "shared": below + 1 if stack in stacks else top}[kind]
    return Depths(depths, top, {names[0]: tuple(names) for names in aliases.values()})


# --- selections and stages --------------------------------------------------------------------


def select(selection: str, depths: Depths, where: str = "finetune.trainable") -> frozenset[str]:
    """The parameter names that ``selection`` trains; ConfigError naming ``where`` when a term
    is unknown, out of range or matches nothing."""
    if not isinstance(selection, str) or not selection.strip():
        raise ConfigError(f"{where}={selection!r} selects nothing; valid: {SELECTIONS}")
    chosen: set[str] = set()
    for term in (t.strip() for t in selection.split(",")):
        if not term:
            raise ConfigError(f"{where}={selection!r} has an empty entry; valid: {SELECTIONS}")
        chosen |= _select_term(term, depths, f"{where}={selection!r}")
    return frozenset(chosen)


def _select_term(term: str, depths: Depths, where: str) -> set[str]:
    if term == "all":
        return set(depths.of)
    if term == "head" or term.startswith("top:"):
        n = 0 if term == "head" else _whole(term.removeprefix("top:"))
        if n is None or not 0 <= n <= depths.blocks:
            raise ConfigError(f"{where}: {term} needs top:N with N a whole number from 0 to "
                              f"{depths.blocks} (the model's blocks)")
        return {name for name, d in depths.of.items() if d >= depths.top - n}
    found = {name for name, names in depths.aliases.items()
             if any(fnmatchcase(alias, term) for alias in names)}
    if not found:
        examples = ", ".join(list(depths.of)[:3])
        raise ConfigError(f"{where}: {term!r} is not all, head or top:N and matches no "
                          f"parameter name (such as {examples}); valid: {SELECTIONS}")
    return found


def _whole(text: str) -> int | None:
    return int(text) if text.isdigit() else None


@dataclass(frozen=True)
class Stage:
    """A stage starts after ``start`` optimizer steps and trains ``trainable`` (the config key
    it came from: ``where``) until the next stage starts."""

    start: int
    trainable: str
    where: str


def parse_stages(ft: Any) -> tuple[Stage, ...]:
    """``finetune.stages`` as stages with their first steps (cumulative), or one stage of
    ``finetune.trainable`` when there are none. Every stage but the last needs ``steps``; the
    last lasts to the end of the run (its ``steps``, if given, changes nothing)."""
    if ft.stages is None:
        return (Stage(0, ft.trainable, "finetune.trainable"),)
    if isinstance(ft.stages, str) or not isinstance(ft.stages, Sequence) or not ft.stages:
        raise ConfigError(f"finetune.stages={ft.stages!r} must be a non-empty list of "
                          "{steps: N, trainable: SELECTION}")
    if ft.trainable != "all":
        raise ConfigError(f"finetune.trainable={ft.trainable!r} and finetune.stages are both "
                          "set: name what trains in each stage and leave finetune.trainable unset")
    stages, start = [], 0
    for i, stage in enumerate(ft.stages):
        key, last = f"finetune.stages[{i}]", i == len(ft.stages) - 1
        if not isinstance(stage, Mapping):
            raise ConfigError(f"{key}={stage!r} is not a mapping {{steps: N, trainable: ...}}")
        unknown = sorted(set(stage) - {"steps", "trainable"})
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]} is not a stage setting; valid: steps, "
                              "trainable")
        if "trainable" not in stage:
            raise ConfigError(f"{key}.trainable is missing; valid: {SELECTIONS}")
        steps = stage.get("steps")
        if steps is None and not last:
            raise ConfigError(f"{key}.steps is missing: every stage but the last needs its "
                              "number of steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 1):
            raise ConfigError(f"{key}.steps={steps!r} must be a whole number >= 1")
        stages.append(Stage(start, stage["trainable"], f"{key}.trainable"))
        start += steps or 0
    return tuple(stages)


# --- the plan: optimizer groups and their LR lambdas ------------------------------------------


@dataclass(frozen=True)
class ParamGroup:
    """Parameters of one optimizer group: same weight decay, LR scale and stage pattern."""

    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    decays: bool  # matrices decay; biases and norm gains do not
    depth: int  # the smallest depth in the group (one depth when layer_decay < 1)
    scale: float  # layer_decay ** (L + 1 - depth)
    trains: tuple[bool, ...]  # in each stage
    numel: int


@dataclass(frozen=True)
class FinetunePlan:
    """Stages and optimizer groups of a run; everything a step needs is a function of it and
    of the step."""

    stages: tuple[Stage, ...]
    groups: tuple[ParamGroup, ...]
    depths: Depths
    layer_decay: float

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Torch param groups: with the default config exactly today's two (matrices with
        ``weight_decay``, then the rest without), in model order."""
        return [{"params": list(g.params), "weight_decay": weight_decay if g.decays else 0.0}
                for g in self.groups]

    def stage_at(self, step: int) -> int:
        """The stage of the optimizer step made after ``step`` steps (0-based index)."""
        return max(i for i, stage in enumerate(self.stages) if stage.start <= step)

    def frozen_in(self, stage: int) -> tuple[bool, ...]:
        return tuple(not g.trains[stage] for g in self.groups)

    @property
    def freezes(self) -> bool:
        """Whether any group is frozen in any stage (else no hook, no flag, no skip)."""
        return not all(all(g.trains) for g in self.groups)

    @property
    def is_default(self) -> bool:
        return not self.freezes and self.layer_decay == 1 and len(self.stages) == 1

    def lr_lambdas(self, multiplier: Callable[[int], float]) -> list[Callable[[int], float]]:
        """One ``LambdaLR`` lambda per group: ``multiplier(step)`` × the group's layer scale,
        0 while it is frozen."""
        return [_group_lr(self, multiplier, k) for k in range(len(self.groups))]

    def trained_numel(self, stage: int) -> int:
        return sum(g.numel for g in self.groups if g.trains[stage])


def _group_lr(plan: FinetunePlan, multiplier: Callable[[int], float],
              k: int) -> Callable[[int], float]:
    """A plain function (``LambdaLR`` saves nothing of those: its state stays today's)."""
    group = plan.groups[k]

    def lr_at(step: int) -> float:
        return multiplier(step) * group.scale if group.trains[plan.stage_at(step)] else 0.0

    return lr_at


def finetune_plan(model: nn.Module, ft: Any) -> FinetunePlan:
    """The plan of ``finetune`` config ``ft`` (a ``FinetuneConfig``) for ``model``, built before
    DeepSpeed partitions it; ConfigError for a bad selection or stage."""
    depths = parameter_depths(model)
    stages = parse_stages(ft)
    chosen = [select(s.trainable, depths, s.where) for s in stages]
    decay = float(ft.layer_decay)
    keyed: dict[tuple[int, bool, tuple[bool, ...]], list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exponent = depths.top - depths.of[name] if decay != 1 else 0
        trains = tuple(name in c for c in chosen)
        keyed.setdefault((exponent, param.dim() >= 2, trains), []).append((name, param))
    # The top's groups first (so the logged LR, group 0's, is the peak LR), matrices before
    # vectors, then in model order (dicts keep it; the sort is stable).
    order = sorted(keyed, key=lambda key: (key[0], not key[1]))
    groups = tuple(ParamGroup(
        names=tuple(n for n, _ in keyed[key]), params=tuple(p for _, p in keyed[key]),
        decays=key[1], depth=min(depths.of[n] for n, _ in keyed[key]), scale=decay ** key[0],
        trains=key[2], numel=sum(p.numel() for _, p in keyed[key])) for key in order)
    return FinetunePlan(stages, groups, depths, decay)


def describe(plan: FinetunePlan) -> str | None:
    """One line on the plan for the log; None for the default (nothing to say)."""
    if plan.is_default:
        return None
    stages = plan.stages
    parts = [", then ".join(f"{s.trainable} for {stages[i + 1].start - s.start} steps"
                            if i + 1 < len(stages) else s.trainable
                            for i, s in enumerate(stages))]
    if plan.layer_decay != 1:
        low = plan.layer_decay ** plan.depths.top
        parts.append(f"layer_decay {plan.layer_decay}: lr x{low:.3g} (embeddings, depth 0) to "
                     f"x1 (head, depth {plan.depths.top})")
    tied = [f"{'/'.join(names)}" for names in plan.depths.aliases.values() if len(names) > 1]
    if tied and plan.freezes:
        parts.append(f"tied {', '.join(tied)} counts as an embedding (depth 0)")
    return f"finetune: {'; '.join(parts)}; {len(plan.groups)} optimizer groups"


# --- at run time ------------------------------------------------------------------------------


class Finetuning:
    """Applies a plan to a live run: :meth:`begin_step` sets which groups are frozen for the
    step about to be made (gradient hooks, the optimizer groups' ``frozen`` flags) from the step
    count alone, so a resume, or a rollback, restores it."""

    def __init__(self, plan: FinetunePlan, optimizer: torch.optim.Optimizer) -> None:
        self.plan, self.optimizer = plan, optimizer
        self._frozen = [False] * len(plan.groups)
        self._stage: int | None = None
        self._hooks = [param.register_hook(functools.partial(self._zero_if_frozen, k))
                       for k, group in enumerate(plan.groups) if not all(group.trains)
                       for param in group.params]

    def _zero_if_frozen(self, k: int, grad: torch.Tensor) -> torch.Tensor | None:
        return torch.zeros_like(grad) if self._frozen[k] else None

    def begin_step(self, step: int) -> None:
        """Freeze what the stage of the step after ``step`` steps freezes; log a stage's start."""
        if self.plan.is_default:
            return
        stage = self.plan.stage_at(step)
        if stage != self._stage:
            self._stage = stage
            self._frozen[:] = self.plan.frozen_in(stage)
            self._log_stage(stage)
        if self.plan.freezes:  # every step: a checkpoint load replaces the group dicts
            for group, frozen in zip(self.optimizer.param_groups, self._frozen, strict=True):
                group["frozen"] = frozen

    def _log_stage(self, stage: int) -> None:
        s, plan = self.plan.stages[stage], self.plan
        total = sum(g.numel for g in plan.groups)
        trained = f"{plan.trained_numel(stage) / 1e6:.2f}M of {total / 1e6:.2f}M parameters train"
        if len(plan.stages) == 1:
            log.info("finetune: %s (%s)", s.trainable, trained)
        else:
            log.info("finetune: stage %d from step %d: %s (%s)", stage + 1, s.start, s.trainable,
                     trained)


def fresh_adam_state(group: dict[str, Any], param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state torch's Adam/AdamW creates lazily at a parameter's first step (zero moments,
    step 0): a frozen group gets it without stepping, so every group's state exists (DeepSpeed
    links it to its universal-checkpoint fragments after the first step) and a later first
    update still bias-corrects from step 1."""
    on_device = group.get("capturable") or group.get("fused")
    wide = torch.get_default_dtype() == torch.float64 and not group.get("fused")
    state = {"step": torch.zeros((), dtype=torch.float64 if wide else torch.float32,
                                 device=param.device if on_device else "cpu"),
             "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
             "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
    if group.get("amsgrad"):
        state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


@contextlib.contextmanager
def frozen_groups_skipped(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within: the parameters of groups flagged ``frozen`` have no gradient, so AdamW's step
    leaves them entirely (weights, moments, step count), as it leaves a parameter with
    ``requires_grad=False``; their gradients are put back after."""
    held = []
    for group in optimizer.param_groups:
        if not group.get("frozen"):
            continue
        for param in group["params"]:
            if param.grad is None:
                continue
            if not optimizer.state[param]:
                optimizer.state[param].update(fresh_adam_state(group, param))
            held.append((param, param.grad))
            param.grad = None
    try:
        yield
    finally:
        for param, grad in held:
            param.grad = grad


def layer_scales(plan: FinetunePlan) -> dict[str, float]:
    """Each parameter's LR factor (for tests and inspection)."""
    return {name: g.scale for g in plan.groups for name in g.names}

