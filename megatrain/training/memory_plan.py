"""Memory planner: what one GPU (and its host process) holds for a model, ZeRO stage, offload,
precision, micro-batch, sequence length and world size — before anything is launched.

Model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020): with mixed precision
2Ψ bytes of parameters, 2Ψ of gradients and 12Ψ of optimizer states (fp32 master, Adam's m and
v), divided by the world size N from stage 1 (optimizer), 2 (+ gradients) and 3 (+ parameters).
But every figure here is what DeepSpeed 0.19 actually allocates for our ``SkippableAdamW``
(checked against measured tensors, tests/integration/test_planner_measured.py), which differs:

- The parameter count and layout come from the real model (built on the meta device), so tied
  weights count once and ZeRO's per-rank partition boundaries are exact.
- Stage 0, bf16/fp16: DeepSpeed's unfused mixed-precision optimizer keeps an *unpartitioned* fp32
  master (4Ψ) and, inside ``step``, an fp32 copy of every gradient (4Ψ) next to the 2Ψ ones.
- Stages 1–2: the parameters live in one flat buffer per optimizer group (padded to 2N). The
  gradient partition is a buffer holding the *whole* gradient of every parameter that touches
  the rank's 1/N slice, so a large embedding that straddles slices is held whole on each rank
  it touches (the busiest rank is reported); the step adds an fp32 copy of the largest group's
  slice (4Ψ/N, in fp32 too unless the slice lies inside one parameter). In fp32 the master slice
  is still a separate copy: optimizer states are 12Ψ/N, not the paper's 8Ψ/N. Stage 1's hooks
  (``contiguous_gradients``) reduce during the last micro-batch's backward like stage 2, so with
  one micro-batch per step it holds what stage 2 holds; with gradient accumulation it keeps the
  full 2Ψ (or 4Ψ) until the last micro-batch.
- Stage 3: each parameter is padded to a multiple of N and partitioned; parameters of at most
  ``stage3_param_persistence_threshold`` (1e5) elements are *also* kept whole on every rank. The
  gradient partition (in the model dtype) is joined, inside ``step``, by an fp32 copy of the
  largest optimizer sub-group (≤ 1e9 elements) — in fp32 too; the fp32 master is always a copy.
- Offload moves the fp32 master, Adam's states and the fp32 gradient slices to host memory, plus
  DeepSpeed's pinned staging buffers (a low-precision copy of the slice, one largest-parameter
  gradient); stage 3 ``offload_param`` moves the parameter partitions too.

Activations are an estimate (``activation_bytes``): Korthikanti et al. 2022's per-layer count
(34·s·b·h bytes for a GPT-2 block in 16-bit) with FlashAttention (no s² term), written out per
family from the tensors our blocks save; the loss peak (fp32 log-softmax and its gradients) and
activation checkpointing (block inputs plus one block recomputed) are included. The overhead is
an estimate too: a fixed CUDA context and DeepSpeed's communication buffers (reduce buckets,
stage 0's all-reduce flattening, stage 3's gathered parameters).

Sizes are in bytes; reports use GB = 1e9 bytes, like ``metrics.memory_gb``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from megatrain.config.schema import Config, DeepSpeedConfig, ModelConfig
from megatrain.config.validate import DEVICE_CHOSEN_PRECISIONS, check_engine_setup
from megatrain.errors import ConfigError
from megatrain.models.registry import get_model_spec, resolve_model_config
from megatrain.models.spec import ActivationShape
from megatrain.training.losses import loss_chunk

GB = 1e9
_DS = DeepSpeedConfig()  # the schema's defaults, for calls that leave settings out
# CUDA context, kernel images and cuBLAS/NCCL workspaces: 0.5-1 GB on recent GPUs; an estimate.
CUDA_CONTEXT_BYTES = 1_000_000_000
# DeepSpeed defaults that megatrain's engine config leaves alone (deepspeed.runtime.engine and
# deepspeed.runtime.zero.config).
ALLREDUCE_BUCKET = 500_000_000  # stage 0 flattens gradients for all-reduce in buckets this big
PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold: smaller params stay whole
SUB_GROUP_SIZE = 1_000_000_000  # stage 3 steps the optimizer per sub-group of this many elements
MASTER, ADAM, STEP = 4, 8, 4  # fp32 master; fp32 exp_avg + exp_avg_sq; AdamW's fp32 step count
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# The loss's peak per token and vocabulary entry: the fp32 log-softmax output that cross-entropy
# keeps plus the fp32 gradients of the loss and of the log-softmax input (trainer._loss casts the
# logits to fp32). A chunked loss (trainer.chunked_loss) has this peak for one chunk of rows.
LOSS_BYTES_PER_LOGIT = 12

GPU_ROWS = ("parameters", "gradients", "optimizer", "activations", "overhead")
CPU_ROWS = ("parameters", "gradients", "optimizer", "buffers")


@dataclass(frozen=True)
class Item:
    """One allocation of the plan: which row it adds to, on which device, and what it is."""

    row: str
    device: str  # gpu | cpu
    nbytes: int
    what: str


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU (busiest rank) and per-rank host bytes, itemised."""

    family: str
    n_params: int
    zero_stage: int
    precision: str
    world_size: int
    micro_batch_size: int
    seq_len: int
    items: tuple[Item, ...]
    gpu_gb: float | None = None

    def _sum(self, device: str, row: str | None = None) -> int:
        return sum(i.nbytes for i in self.items if i.device == device and row in (None, i.row))

    @property
    def gpu(self) -> dict[str, int]:
        return {row: self._sum("gpu", row) for row in GPU_ROWS}

    @property
    def cpu(self) -> dict[str, int]:
        return {row: self._sum("cpu", row) for row in CPU_ROWS}

    @property
    def total(self) -> int:
        """GPU bytes of the busiest rank: every row added (activations and the step's
        temporaries do not quite coexist, so this errs high)."""
        return self._sum("gpu")

    @property
    def cpu_total(self) -> int:
        return self._sum("cpu")

    def state_bytes(self, row: str) -> int:
        """Bytes of ``row`` wherever they live (GPU + host): what the measured test compares."""
        return self._sum("gpu", row) + self._sum("cpu", row)

    @property
    def fits(self) -> bool | None:
        """Whether ``total`` fits ``gpu_gb``; None when no GPU size was given."""
        return None if self.gpu_gb is None else self.total <= self.gpu_gb * GB


# --- the model's parameters as DeepSpeed sees them ------------------------------------------


def param_groups(model: Any) -> list[list[int]]:
    """Element counts of the optimizer's groups in order, as ``engine.build_optimizer`` makes
    them (matrices with weight decay, then vectors; empty groups dropped, as DeepSpeed does)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [[p.numel() for p in params if p.dim() >= 2], [p.numel() for p in params
                                                            if p.dim() < 2]]
    return [g for g in groups if g]


def _resolved(model_cfg: Any, family: str, vocab_size: int) -> Any:
    spec = get_model_spec(family)
    if isinstance(model_cfg, spec.config_cls):
        return model_cfg
    values = dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) \
        else dict(model_cfg)
    values["family"] = family
    return resolve_model_config(values, vocab_size)


def model_param_groups(config: Any, family: str) -> list[list[int]]:
    """Build the model on the meta device (no memory) and read its groups."""
    import torch

    model = get_model_spec(family).build(config, "meta", torch.float32)
    return param_groups(model)


# --- model states per ZeRO stage ------------------------------------------------------------


@dataclass(frozen=True)
class Zero12Group:
    """One optimizer group under ZeRO 1-2, as DeepSpeed lays it out."""

    padded: int  # the flat buffer's elements, padded to a multiple of 2N
    part: int  # each rank's slice of it
    touched: tuple[int, ...]  # per rank: elements of every parameter touching its slice
    pieces: tuple[int, ...]  # per rank: parameters (and padding) its slice is made of


def zero12_partition(group: list[int], world_size: int) -> Zero12Group:
    """Slice a group's flat buffer into ``world_size`` equal parts and see what each touches."""
    total = sum(group)
    align = 2 * world_size  # DeepSpeed pads the flat buffer to a 4-byte boundary per rank
    padded = math.ceil(total / align) * align
    part = padded // world_size
    touched, pieces = [0] * world_size, [0] * world_size
    offset = 0
    for numel in group:
        for rank in range(offset // part, min((offset + numel - 1) // part, world_size - 1) + 1):
            touched[rank] += numel
            pieces[rank] += 1
        offset += numel
    for rank in range(world_size):
        if (rank + 1) * part > total:  # the slice ends in padding: one more piece
            pieces[rank] += 1
    # A slice with no parameter at all gets a zero buffer of its own size.
    return Zero12Group(padded, part, tuple(t or part for t in touched), tuple(pieces))


def _zero12_grads(parts: list[Zero12Group], b: int, rank: int) -> int:
    """The rank's gradient bytes at the step: its gradient buffer, plus the fp32 slice DeepSpeed
    builds for one group at a time — a copy unless the slice is one fp32 tensor already (a view
    into one parameter's gradient)."""
    copies = [g.part for g in parts if b != 4 or g.pieces[rank] > 1]
    return b * sum(g.touched[rank] for g in parts) + 4 * max(copies, default=0)


def _stage0(groups: list[list[int]], b: int, n_tensors: int) -> list[Item]:
    n = sum(map(sum, groups))
    items = [Item("parameters", "gpu", b * n, f"{b}-byte weights (Ψ = {n:,})"),
             Item("gradients", "gpu", b * n, f"{b}-byte gradients")]
    if b != 4:
        items += [Item("gradients", "gpu", 4 * n, "fp32 copies of the gradients inside step "
                       "(DeepSpeed's unfused mixed-precision optimizer)"),
                  Item("optimizer", "gpu", MASTER * n, "fp32 master weights, not partitioned")]
    items.append(Item("optimizer", "gpu", ADAM * n + STEP * n_tensors, "Adam m and v (fp32)"))
    items.append(Item("overhead", "gpu", b * min(n, ALLREDUCE_BUCKET),
                      "all-reduce: gradients flattened in 5e8-element buckets"))
    return items


def _stage12(groups: list[list[int]], b: int, n_ranks: int, offload: bool,
             grad_accum_steps: int, zero_stage: int) -> list[Item]:
    parts = [zero12_partition(g, n_ranks) for g in groups]
    padded = sum(p.padded for p in parts)
    sl = sum(p.part for p in parts)  # one rank's slices, all groups
    where = "cpu" if offload else "gpu"
    items = [Item("parameters", "gpu", b * padded, f"{b}-byte flat weights, every rank"),
             Item("optimizer", where, (MASTER + ADAM) * sl + STEP * len(groups),
                  f"fp32 master slice + Adam m, v: 12 bytes × Ψ/N ({sl:,})")]
    if offload:
        largest = max(max(g) for g in groups)
        items += [Item("gradients", "cpu", 4 * sl, "fp32 gradient slice (pinned)"),
                  Item("buffers", "cpu", b * sl + b * largest, "pinned staging: weights slice "
                       "and one largest-parameter gradient"),
                  Item("overhead", "gpu", b * largest, "offload staging: one largest gradient")]
        if grad_accum_steps > 1:
            touched = max(sum(p.touched[r] for p in parts) for r in range(n_ranks))
            items.append(Item("buffers", "cpu", b * touched, "gradients accumulated on the host"))
        return items
    grads = max(_zero12_grads(parts, b, r) for r in range(n_ranks))  # the busiest rank
    if zero_stage == 1 and grad_accum_steps > 1:  # no reduction before the last micro-batch
        grads = max(grads, b * sum(map(sum, groups)))
    items.append(Item("gradients", "gpu", grads, "whole gradients of the parameters touching "
                      "the rank's slice + an fp32 slice inside step"))
    return items


def stage3_subgroups(groups: list[list[int]], n_ranks: int) -> list[int]:
    """Partition elements per optimizer sub-group (DeepSpeed's ``_create_fp16_sub_groups``)."""
    subgroups = []
    for group in groups:
        parts = [math.ceil(n / n_ranks) for n in group]
        if SUB_GROUP_SIZE >= sum(parts):
            subgroups.append(sum(parts))
            continue
        size = 0
        for i, part in enumerate(parts):
            size += part
            if size >= SUB_GROUP_SIZE or i == len(parts) - 1:
                subgroups.append(size)
                size = 0
    return subgroups


def _stage3(groups: list[list[int]], b: int, n_ranks: int, offload_optimizer: bool,
            offload_param: bool, reduce_bucket: int, prefetch_bucket: int) -> list[Item]:
    subgroups = stage3_subgroups(groups, n_ranks)
    part = sum(subgroups)
    flat = [n for g in groups for n in g]
    persistent = sum(n for n in flat if n <= PERSISTENCE_THRESHOLD)
    gathered = sum(flat) - persistent
    opt_dev = "cpu" if offload_optimizer else "gpu"
    items = [Item("parameters", "cpu" if offload_param else "gpu", b * part,
                  f"{b}-byte partitions, padded to N ({part:,})"),
             Item("parameters", "gpu", b * persistent,
                  f"whole copies of parameters ≤ {PERSISTENCE_THRESHOLD:,} elements"),
             Item("gradients", opt_dev, b * part, f"{b}-byte gradient partitions"),
             # The step copies each sub-group's gradients to fp32 in turn; offloaded, all at once.
             Item("gradients", opt_dev, 4 * (part if offload_optimizer else max(subgroups)),
                  "fp32 copy of the gradients inside step"),
             Item("optimizer", opt_dev, (MASTER + ADAM) * part + STEP * len(subgroups),
                  "fp32 master partition + Adam m, v"),
             Item("overhead", "gpu", b * reduce_bucket, "reduce bucket"),
             Item("overhead", "gpu", b * min(gathered, prefetch_bucket + 2 * max(flat)),
                  "gathered parameters: prefetch bucket + the module in use and its gradient")]
    return items


def model_state_items(groups: list[list[int]], *, zero_stage: int, precision: str,
                      world_size: int, offload_optimizer: bool = False,
                      offload_param: bool = False, grad_accum_steps: int = 1,
                      reduce_bucket_size: int = 500_000_000, overlap_comm: bool = True,
                      stage3_prefetch_bucket_size: int = 50_000_000) -> list[Item]:
    """Parameters, gradients, optimizer states and DeepSpeed's buffers of the busiest rank."""
    b = PRECISION_BYTES[precision]
    if zero_stage == 0:
        return _stage0(groups, b, sum(len(g) for g in groups))
    if zero_stage in (1, 2):
        items = _stage12(groups, b, world_size, offload_optimizer, grad_accum_steps, zero_stage)
        buckets = 2 if overlap_comm else 1
        return items + [Item("overhead", "gpu", buckets * b * reduce_bucket_size,
                             f"{buckets} reduce bucket(s) during the backward")]
    return _stage3(groups, b, world_size, offload_optimizer, offload_param, reduce_bucket_size,
                   stage3_prefetch_bucket_size)


# --- activations ----------------------------------------------------------------------------


def _norm_units(kind: str, b: int) -> int:
    """Activation-sized tensors a norm keeps: LayerNorm its input; our RMSNorm an fp32 copy of
    the input (two 16-bit units) and the normalised value."""
    if kind == "layer":
        return 1
    return 2 if b == 4 else 3


def _attention_units(d: int, inner: int) -> int:
    """Self-attention per token: the q/k/v projection's input (d), q, k, v (k, v repeated to all
    heads, as SDPA needs), the attention output and its re-laid-out copy, the projection's input.
    FlashAttention keeps only a log-sum-exp per head besides: no s² term."""
    return d + 3 * inner + 2 * inner


def _mlp_units(d: int, d_ff: int, gated: bool) -> int:
    """fc input, then GELU's input and output; gated (SwiGLU, gated GELU): gate, activation,
    up-projection and their product."""
    return d + (4 if gated else 2) * d_ff


def _head_units(shape: ActivationShape, b: int) -> int:
    """Elements per token (in units of d) kept after the last block: its norms and inputs."""
    return shape.head_norms * _norm_units(shape.norm, b) + shape.head_units


def _block_units(config: Any, shape: ActivationShape, b: int, inner: int) -> int:
    d = config.d_model
    return (2 * _norm_units(shape.norm, b) * d + _attention_units(d, inner)
            + _mlp_units(d, config.d_ff, shape.gated))


def _decoder_block_units(config: Any, shape: ActivationShape, b: int, inner: int,
                         ratio: float) -> float:
    """A decoder block per decoder token: a self-attention block plus cross-attention (its norm,
    q and output; k and v are per encoder token: ``ratio`` encoder tokens per decoder token)."""
    d = config.d_model
    cross = _norm_units(shape.norm, b) * d + d + inner + 2 * inner + 2 * inner * ratio
    return _block_units(config, shape, b, inner) + cross


@dataclass(frozen=True)
class Activations:
    """Activation bytes per micro-batch, in parts: what the forward keeps for the blocks, one
    block recomputed in the backward (activation checkpointing), the head's inputs, the loss."""

    blocks: int
    recompute: int
    head: int
    loss: int
    loss_chunk: int = 0  # rows of logits at a time (chunked loss); 0: all of them

    @property
    def total(self) -> int:
        return self.blocks + self.recompute + self.head + self.loss


def decoder_length(seq_len: int, noise_density: float = 0.15, mean_span: float = 3.0) -> int:
    """T5's target length for ``seq_len`` encoder tokens under span corruption."""
    from megatrain.data.stream.objectives import raw_length_for, span_lengths

    noise, spans, _ = span_lengths(raw_length_for(seq_len, noise_density, mean_span),
                                   noise_density, mean_span)
    return noise + spans + 1


def activation_bytes(config: Any, family: str, *, precision: str, micro_batch_size: int,
                     seq_len: int, activation_checkpointing: bool = False,
                     decoder_len: int | None = None, chunked_loss: str = "auto") -> Activations:
    """Estimated activation memory of one micro-batch at its peak (the end of the forward).

    Per block and token, in activation-dtype units: 2 norms + attention + MLP (a GPT-2 block: 9d
    + 2·d_ff = 17d, ×2 bytes = Korthikanti's 34·h). Dropout > 0 adds two 1-byte masks of d. With
    activation checkpointing only each block's input (d) is kept, plus one block recomputed in
    the backward. Then the head, and the loss: logits in the model dtype plus 12 bytes of fp32
    per logit (``LOSS_BYTES_PER_LOGIT``), for every output token, or with a chunked loss
    (``chunked_loss``, ``losses.loss_chunk``) for one chunk's rows (:func:`loss_bytes`).
    """
    b = PRECISION_BYTES[precision]
    tokens = micro_batch_size * seq_len
    d, shape = config.d_model, get_model_spec(family).activations
    inner = getattr(config, "inner_dim", d)
    per_block = [(tokens, _block_units(config, shape, b, inner) * b + _masks(config, 2))] \
        * config.n_layers
    out_tokens, extra = tokens, 0
    if shape.encoder_decoder:
        dec = decoder_len or decoder_length(seq_len)
        out_tokens = micro_batch_size * dec
        dec_units = _decoder_block_units(config, shape, b, inner, seq_len / dec)
        per_block += [(out_tokens, dec_units * b + _masks(config, 3))] * config.n_decoder_layers
        # the encoder output (cross-attention's input), and per stack the relative-position
        # bias and its additive mask (s², but once per stack, not per layer)
        extra = tokens * d * b + 2 * b * config.n_heads * micro_batch_size * (seq_len ** 2
                                                                                 + dec ** 2)
    if activation_checkpointing:
        blocks = sum(t * d * b for t, _ in per_block)
        recompute = max(t * u for t, u in per_block)
    else:
        blocks, recompute = sum(t * u for t, u in per_block), 0
    head = out_tokens * _head_units(shape, b) * d * b
    rows = loss_chunk(chunked_loss, config.vocab_size, out_tokens)
    loss = loss_bytes(config.vocab_size, d, out_tokens, b, rows)
    return Activations(int(blocks + extra), int(recompute), int(head), int(loss), rows)


def loss_bytes(vocab_size: int, d_model: int, tokens: int, b: int, rows: int = 0) -> int:
    """The loss's peak over ``tokens`` output tokens in a ``b``-byte dtype: the logits and the
    fp32 cross-entropy of all of them, or of ``rows`` at a time (a chunked loss), which also
    keeps one fp32 log-sum-exp per token and, below fp32, an fp32 accumulator of the head
    weight's gradient plus each chunk's part of it (vocab x d each)."""
    if not rows:
        return tokens * vocab_size * (b + LOSS_BYTES_PER_LOGIT)
    extra = 4 * tokens + (0 if b == 4 else vocab_size * d_model * (4 + b))
    return rows * vocab_size * (b + LOSS_BYTES_PER_LOGIT) + extra


def _masks(config: Any, n: int) -> int:
    """Bytes per token of ``n`` 1-byte dropout masks of d (none without dropout)."""
    return n * config.d_model if getattr(config, "dropout", 0.0) > 0 else 0


# --- the plan -------------------------------------------------------------------------------


def plan_memory(model_cfg: ModelConfig | Any, family: str, *, zero_stage: int, offload_optimizer: bool,
                offload_param: bool, precision: str, micro_batch_size: int, seq_len: int,
                world_size: int, activation_checkpointing: bool, vocab_size: int,
                gpu_gb: float | None = None, grad_accum_steps: int = 1,
                reduce_bucket_size: int = _DS.reduce_bucket_size,
                overlap_comm: bool = _DS.overlap_comm,
                stage3_prefetch_bucket_size: int = _DS.stage3_prefetch_bucket_size,
                decoder_len: int | None = None, chunked_loss: str = "auto") -> MemoryPlan:
    """The memory plan of one training setup. ``model_cfg`` is a ``model`` config (a size and/or
    dims, resolved with ``vocab_size``) or an already resolved family config. ``precision`` auto
    (and bf16_if_native) means bf16 (a GPU that has it)."""
    check_engine_setup(zero_stage, offload_optimizer, offload_param, precision)
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be at least 1")
    precision = "bf16" if precision in DEVICE_CHOSEN_PRECISIONS else precision
    config = _resolved(model_cfg, family, vocab_size)
    groups = model_param_groups(config, family)
    items = model_state_items(
        groups, zero_stage=zero_stage, precision=precision, world_size=world_size,
        offload_optimizer=offload_optimizer, offload_param=offload_param,
        grad_accum_steps=grad_accum_steps, reduce_bucket_size=reduce_bucket_size,
        overlap_comm=overlap_comm, stage3_prefetch_bucket_size=stage3_prefetch_bucket_size)
    acts = activation_bytes(config, family, precision=precision,
                            micro_batch_size=micro_batch_size, seq_len=seq_len,
                            activation_checkpointing=activation_checkpointing,
                            decoder_len=decoder_len, chunked_loss=chunked_loss)
    items += [Item("activations", "gpu", acts.blocks, "blocks" + (
                   " (checkpointed: their inputs)" if activation_checkpointing else "")),
              Item("activations", "gpu", acts.recompute, "one block recomputed in the backward"),
              Item("activations", "gpu", acts.head, "final norm and head inputs"),
              Item("activations", "gpu", acts.loss, "logits and the fp32 loss peak" + (
                  f" ({acts.loss_chunk} rows at a time)" if acts.loss_chunk else "")),
              Item("overhead", "gpu", CUDA_CONTEXT_BYTES, "CUDA context and workspaces")]
    return MemoryPlan(family, sum(map(sum, groups)), zero_stage, precision, world_size,
                      micro_batch_size, seq_len, tuple(items), gpu_gb)


def plan_from_config(cfg: Config, world_size: int,
                     gpu_gb: float | None = None) -> MemoryPlan:
    """The plan for a composed megatrain config (what ``megatrain-train`` would run). The
    vocabulary is ``model.vocab_size``, else ``data.vocab_size`` (the tokenizer's is not known
    before the corpus is prepared)."""
    m, t, ds, data = cfg.model, cfg.trainer, cfg.deepspeed, cfg.data
    family = m.family
    dec = None
    if get_model_spec(family).activations.encoder_decoder:
        dec = decoder_length(data.seq_len, data.noise_density, data.mean_span)
    return plan_memory(
        m, family, zero_stage=ds.zero_stage, offload_optimizer=ds.offload_optimizer,
        offload_param=ds.offload_param, precision=t.precision,
        micro_batch_size=t.micro_batch_size, seq_len=data.seq_len, world_size=world_size,
        activation_checkpointing=t.activation_checkpointing,
        vocab_size=m.vocab_size or data.vocab_size, gpu_gb=gpu_gb,
        grad_accum_steps=t.grad_accum_steps, reduce_bucket_size=ds.reduce_bucket_size,
        overlap_comm=ds.overlap_comm, stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
        decoder_len=dec, chunked_loss=t.chunked_loss)


# --- the report -----------------------------------------------------------------------------


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:9.2f}"


def format_plan(plan: MemoryPlan, verbose: bool = False) -> str:
    """The table ``megatrain-plan`` prints."""
    title = (f"memory plan (estimates): {plan.family}, {plan.n_params / 1e6:.1f}M parameters, "
             f"ZeRO-{plan.zero_stage}, {plan.precision}, {plan.world_size} rank(s), micro-batch "
             f"{plan.micro_batch_size} × {plan.seq_len} tokens")
    lines = [title, f"{'per GPU (busiest rank)':<28}{'GB':>9}"]
    for row, nbytes in plan.gpu.items():
        lines.append(f"  {row:<26}{_gb(nbytes)}")
        lines += _details(plan, "gpu", row) if verbose else []
    lines.append(f"  {'total':<26}{_gb(plan.total)}")
    if plan.gpu_gb is not None:
        room = plan.gpu_gb * GB - plan.total
        verdict = f"yes, {room / GB:.2f} GB to spare" if plan.fits else \
            f"NO, {-room / GB:.2f} GB short"
        lines.append(f"  {'fits ' + f'{plan.gpu_gb:g} GB?':<26} {verdict}")
    if plan.cpu_total:
        lines.append(f"{'host, per rank (offload)':<28}{'GB':>9}")
        for row, nbytes in plan.cpu.items():
            if nbytes:
                lines.append(f"  {row:<26}{_gb(nbytes)}")
                lines += _details(plan, "cpu", row) if verbose else []
        lines.append(f"  {'total':<26}{_gb(plan.cpu_total)}   "
                     f"(× {plan.world_size} ranks: {plan.cpu_total * plan.world_size / GB:.2f})")
    return "\n".join(lines)


def _details(plan: MemoryPlan, device: str, row: str) -> list[str]:
    return [f"      {_gb(i.nbytes)}  {i.what}" for i in plan.items
            if i.device == device and i.row == row and i.nbytes]


__all__ = ["Activations", "Item", "MemoryPlan", "activation_bytes", "format_plan", "loss_bytes",
           "model_state_items", "param_groups", "plan_from_config", "plan_memory",
           "stage3_subgroups", "zero12_partition"]
