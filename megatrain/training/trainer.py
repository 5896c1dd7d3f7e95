"""The training loop: ``train`` → ``train_step`` → ``forward_backward_step``, plus eval and saves.

The hot path stays on the device: losses are summed into a device tensor and read back only at
log steps, so a step issues no host–device synchronisation of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatrain.config.schema import Config
from megatrain.data.manifest import TASK_FORMATS
from megatrain.data.prepare.templates import Template, make_template, prompt_pieces
from megatrain.data.stream.objectives import IGNORE, Objective, build_objective
from megatrain.data.stream.trace import TraceWriter
from megatrain.data.stream.train_stream import (
    build_train_stream,
    estimate_batches_per_epoch,
    iter_eval_batches,
)
from megatrain.data.tokenizer import load_tokenizer
from megatrain.distributed import World
from megatrain.errors import ConfigError
from megatrain.eval.during_training import TABLE_KEY, GenerationEval
from megatrain.hf_export import export as export_checkpoint
from megatrain.metrics import MetricSinks, ResumePoint, build_sinks
from megatrain.metrics.throughput import Throughput, memory_gb
from megatrain.models.flops import peak_tflops_for
from megatrain.models.generation import generate
from megatrain.models.registry import get_model_spec, resolve_model_config, with_heads
from megatrain.training import checkpoint as ckpt
from megatrain.training.best import BestTracker
from megatrain.training.data_setup import check_same_tokenizer, resolve_train_data, shard_io
from megatrain.training.engine import clips_itself, initialize_engine, resolve_precision
from megatrain.training.epochs import EpochPlan, FiniteBatches
from megatrain.training.fault_injection import FaultInjection
from megatrain.training.losses import (
    BPB_OBJECTIVE,
    check_chunked_loss,
    eval_metric_names,
    eval_metrics,
    eval_sums,
    label_bytes,
    model_inputs,
    training_loss,
)
from megatrain.training.numerics import StepGuard, Verdict
from megatrain.training.pretrained import load_pretrained_weights, pretrained_config
from megatrain.training.signals import Preempted, StopSignals
from megatrain.training.transforms import apply_transforms, resolve_compile

log = logging.getLogger("megatrain")
TASK_BASE = {"sft": "clm", "cls": "mlm", "seq2seq": "span"}  # the family objective a task needs


@dataclass
class Progress:
    """Counters that a checkpoint carries besides the engine's own state."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # updates skipped for a non-finite loss
    rollbacks: int = 0  # loss spikes rolled back to the last checkpoint


def _total_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The global L2 norm of the (already averaged) gradients, before clipping."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class Trainer:
    """Builds everything from a resolved config, then ``train()`` runs to ``trainer.max_steps``."""

    def __init__(self, cfg: Config, world: World, device: torch.device,
                 signals: StopSignals | None = None) -> None:
        self.cfg, self.world, self.device = cfg, world, device
        self.run_dir = Path(cfg.run.dir)
        self.sources, self.train_manifest, self.eval_manifest = resolve_train_data(
            cfg.data, world, cfg.model.init_from)
        self.tokenizer = load_tokenizer(self.train_manifest.tokenizer_path)
        self.precision = resolve_precision(cfg.trainer.precision, device)
        self.resume_from = ckpt.find_checkpoint(self.run_dir, cfg.run.resume)
        self.spec = get_model_spec(cfg.model.family)
        self.task = self._task()
        self.gen_eval = GenerationEval.build(cfg.trainer.eval_generate, cfg.model.family)
        self.model_cfg, model = self._build_model()
        # the token loss chunked by the model (trainer.chunked_loss), for model_inputs
        self._chunked_loss = (check_chunked_loss(cfg.trainer.chunked_loss),
                              self.model_cfg.vocab_size)
        self.objective = self._build_objective()
        self._byte_lengths = torch.from_numpy(self.tokenizer.byte_lengths()) \
            if self.task == BPB_OBJECTIVE else None  # eval_bpb's bytes per token
        self.epoch_plan = self._epoch_plan()  # before the engine: it sets the schedule's length
        self.resume_layout = "same" if self.resume_from is None else ckpt.resume_layout(
            self.resume_from, world.world_size, cfg.deepspeed.zero_stage)
        if self.resume_layout == ckpt.UNIVERSAL:
            ckpt.universal_checkpoint(self.resume_from, world.rank)
        self.engine, self.optimizer = initialize_engine(
            model, cfg, self.precision, world.world_size, device,
            load_universal=self.resume_layout == ckpt.UNIVERSAL)
        self.guard = StepGuard(cfg.trainer, world.world_size) if cfg.trainer.skip_nonfinite \
            else None
        self.faults = FaultInjection.from_env()
        self.stream = build_train_stream(
            self.train_manifest, seq_len=cfg.data.seq_len,
            micro_batch_size=cfg.trainer.micro_batch_size, seed=cfg.trainer.seed,
            rank=world.rank, world_size=world.world_size, num_workers=cfg.data.num_workers,
            shuffle=cfg.data.shuffle, pin_memory=device.type == "cuda", objective=self.objective,
            sources=self.sources, pack_whole_docs=cfg.data.pack_whole_docs,
            max_skip_fraction=cfg.data.max_skip_fraction, io=shard_io(cfg.data),
            epochs=cfg.trainer.epochs, shuffle_rows=cfg.data.shuffle_rows)
        self.progress = Progress()
        self.data_ended = False  # trainer.epochs: the data ended on every rank
        self.signals = signals or StopSignals()
        # DeepSpeed reports the gradient norm from its ZeRO / mixed-precision optimizers only.
        self._engine_hides_grad_norm = clips_itself(cfg.deepspeed.zero_stage, self.precision)
        self._grad_norm: torch.Tensor | None = None
        self._parts: dict[str, torch.Tensor] = {}  # loss parts (MLM + NSP) summed since the log
        self._micro_batches_since_log = 0
        resume_point = self._maybe_resume()
        self._saved_step = self.progress.step if self.resume_from else None
        self.best = BestTracker.load(self.run_dir / "checkpoints", cfg.trainer.keep_best,
                                     eval_metric_names(self.task, bool(cfg.data.nsp))
                                     + (self.gen_eval.metric_names if self.gen_eval else [])
                                     ) if cfg.trainer.keep_best else None
        self.trace = TraceWriter(self.run_dir, world.rank, world.world_size,
                                 self.progress.step) if cfg.data.trace else None
        self.sinks = self._build_sinks(resume_point) if world.is_main else None
        peak = cfg.trainer.peak_tflops or peak_tflops_for(device)
        self.throughput = Throughput(self.spec.flops_per_token(self.model_cfg, cfg.data.seq_len),
                                     peak, world.world_size)

    # --- set-up -------------------------------------------------------------------------------

    def _task(self) -> str:
        """The objective of the run's data: ``data.objective``, else the task corpus's format,
        else the family's pretraining objective — checked against the corpus and the family."""
        data, family = self.cfg.data, self.cfg.model.family
        fmt = self.train_manifest.task["format"] if self.train_manifest.task else None
        name = data.objective or fmt or self.spec.objective
        eval_task = self.eval_manifest.task
        if (eval_task["format"] if eval_task else None) != fmt:
            raise ConfigError(f"data.eval={data.eval} is not the same kind of data as data.train="
                              f"{data.train} ({fmt or 'pretraining'})")
        if fmt == "cls" and eval_task["labels"] != self.train_manifest.task["labels"]:
            raise ConfigError(f"data.eval={data.eval} names its classes {eval_task['labels']}, "
                              f"data.train={data.train} {self.train_manifest.task['labels']}: "
                              "prepare both with the same --labels")
        if fmt and name != fmt:
            raise ConfigError(f"data.train={data.train} is {fmt} task data (megatrain-prepare "
                              f"--format {fmt}); data.objective={name} cannot train on it")
        if name in TASK_FORMATS and not fmt:
            raise ConfigError(f"data.objective={name} needs task data (megatrain-prepare --format "
                              f"{name}); data.train={data.train} is a pretraining corpus")
        needs = TASK_BASE.get(name, name)
        if needs != self.spec.objective:
            raise ConfigError(f"data.objective={name} does not fit model.family={family}, which "
                              f"trains on {self.spec.objective}")
        if data.nsp and name != "mlm":
            raise ConfigError(f"data.nsp={data.nsp} is a part of masked-LM pretraining; "
                              f"data.objective is {name}")
        return name

    def _num_labels(self) -> int:
        return len(self.train_manifest.task["labels"]) if self.task == "cls" else 0

    def _build_model(self) -> tuple[Any, torch.nn.Module]:
        cfg, spec = self.cfg, self.spec
        vocab_size = self.tokenizer.vocab_size
        heads = {"num_labels": self._num_labels(), "nsp": bool(cfg.data.nsp)}
        init_state = None
        if cfg.model.init_from:
            model_cfg, init_state = pretrained_config(cfg.model.init_from, cfg.model, vocab_size,
                                                      weights=self.resume_from is None, **heads)
            check_same_tokenizer(cfg.model.init_from, self.train_manifest)
        else:
            model_cfg = with_heads(resolve_model_config(cfg.model, vocab_size=vocab_size),
                                   **heads)
        if cfg.data.seq_len > model_cfg.max_seq_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len "
                              f"({model_cfg.max_seq_len})")
        torch.manual_seed(cfg.trainer.seed)  # the same initial weights on every rank
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        model = spec.build(model_cfg, self.device, dtype)
        if init_state is not None:
            load_pretrained_weights(model, init_state, cfg.model.init_from)
            log.info("model initialised from %s", cfg.model.init_from)
        torch.manual_seed(cfg.trainer.seed + self.world.rank)  # per-rank dropout streams
        log.info("model: %s %s, %.2fM parameters", cfg.model.family,
                 f"from {cfg.model.init_from}" if cfg.model.init_from else cfg.model.size or "custom",
                 sum(p.numel() for p in model.parameters()) / 1e6)
        t = cfg.trainer
        compile_blocks = resolve_compile(t.compile, self.device, cfg.deepspeed.zero_stage)
        return model_cfg, apply_transforms(model, t.activation_checkpointing, compile_blocks,
                                           fp8=t.fp8)

    def _build_objective(self) -> Objective:
        data, family = self.cfg.data, self.cfg.model.family
        if self.cfg.trainer.sample_prompt and not self.spec.generates:
            raise ConfigError(f"trainer.sample_prompt: model.family={family} ({self.task}) does "
                              "not generate text; unset it")
        return build_objective(self.task, data.seq_len, self.tokenizer,
                               doc_masking=data.doc_masking, mask_prob=data.mask_prob,
                               noise_density=data.noise_density, mean_span=data.mean_span,
                               whole_word_masking=data.whole_word_masking,
                               target_len=data.target_len, sft_loss_on=data.sft.loss_on,
                               sft_packing=data.sft.packing, num_labels=self._num_labels() or None,
                               nsp=data.nsp)

    def _epoch_plan(self) -> EpochPlan | None:
        """With ``trainer.epochs``: the steps per epoch from the manifest's counts, and
        ``trainer.max_steps`` (the schedule's length) set to all epochs' steps."""
        t = self.cfg.trainer
        if t.epochs is None:
            return None
        batches = estimate_batches_per_epoch(
            self.sources or self.train_manifest, self.objective,
            micro_batch_size=t.micro_batch_size, world_size=self.world.world_size,
            num_workers=self.cfg.data.num_workers, epochs=t.epochs,
            pack_whole_docs=self.cfg.data.pack_whole_docs)
        plan = EpochPlan(t.epochs, batches / t.grad_accum_steps)
        t.max_steps = plan.max_steps
        log.info("trainer.epochs=%d: about %.1f steps per epoch, %d in all (the schedule's "
                 "length)", t.epochs, plan.steps_per_epoch, plan.max_steps)
        return plan

    def _maybe_resume(self) -> ResumePoint | None:
        """Load the checkpoint ``run.resume`` names; return where it left the metrics."""
        found = self.resume_from
        if found is None:
            return None
        state = ckpt.load_checkpoint(self.engine, found, self.world.rank, self.resume_layout)
        self.progress = Progress(**state["progress"])
        own = state["stream"]  # other ranks' states too when the layout changed (elastic)
        self.stream.load_state_dict(
            ckpt.stream_states(found) if self.stream.needs_every_rank(own) else own)
        ckpt.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (weights checksum %r, saved %r)", found,
                 self.progress.step, self._weights_checksum(), state.get("weights_checksum"))
        elsewhere = not found.resolve().is_relative_to(self.run_dir.resolve())
        return ResumePoint.from_state(state, elsewhere)  # elsewhere: another run's checkpoint

    def _build_sinks(self, resume_point: ResumePoint | None) -> MetricSinks:
        config = dataclasses.asdict(self.cfg)
        config["model_resolved"] = vars(self.model_cfg)
        return build_sinks(self.cfg, self.run_dir, resume_point, config)

    # --- the loop -----------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """Train to ``trainer.max_steps`` (or to the end of ``trainer.epochs``); eval, save and
        log on their schedules; at the end make sure the last step is evaluated and saved, and
        export when asked."""
        t = self.cfg.trainer
        batches = iter(self.stream)
        if self.epoch_plan:
            batches = FiniteBatches(batches)
        loss_sum = torch.zeros((), device=self.device)
        steps_in_window = 0
        last_eval: dict[str, float] = {}
        evaluated_at = None
        self.throughput.reset()
        while self.epoch_plan or self.progress.step < t.max_steps:
            step = self.progress.step + 1
            log_now = step % t.log_every == 0 or step == t.max_steps
            loss = self.train_step(batches, measure_grad_norm=log_now)
            if self.data_ended:
                break
            if self.progress.step < step:  # rolled back: this step and the window's are
                loss_sum.zero_()  # abandoned; nothing of them is logged, evaluated or saved
                steps_in_window = 0
                continue
            if loss is not None:
                loss_sum += loss
                steps_in_window += 1
            if log_now and steps_in_window:
                self._log_train(loss_sum / steps_in_window)
                loss_sum.zero_()
                steps_in_window = 0
            if self._due(step, t.eval_every, t.eval_each_epoch):
                last_eval, evaluated_at = self.evaluate(), step
            saved = self._due(step, t.save_every, t.save_each_epoch)
            if saved:
                self.save()
            if evaluated_at == step:
                saved = self._keep_if_best(last_eval, step, saved)
            last = not self.epoch_plan and step == t.max_steps
            if step == self.faults.preempt_step:
                self.signals.received = signal.SIGTERM
            if not last and self.signals.should_stop():  # at the end: just finish
                self._stop_on_signal(already_saved=saved)
        if steps_in_window:  # the data ended inside a log window
            self._log_train(loss_sum / steps_in_window)
        if evaluated_at != self.progress.step:  # the data ended, or resumed at the end
            last_eval = self.evaluate()
            self._keep_if_best(last_eval, self.progress.step,
                               self._saved_step == self.progress.step)
        if self._saved_step != self.progress.step:
            self.save()
        if self.sinks:
            self.sinks.commit()  # complete: the rows after the last checkpoint are final too
        self._export()
        return last_eval

    def _due(self, step: int, every: int, each_epoch: bool) -> bool:
        """Whether an eval or save falls on ``step``: every N steps, at the last step of a
        step-count run, at epoch ends when asked."""
        if step % every == 0 or (not self.epoch_plan and step == self.cfg.trainer.max_steps):
            return True
        return each_epoch and self.epoch_plan is not None and self.epoch_plan.epoch_end(step)

    def _keep_if_best(self, row: dict[str, float], step: int, saved: bool) -> bool:
        """With ``trainer.keep_best``: save ``step`` if its eval improved the metric, and record
        it as the best. Returns whether ``step`` is saved."""
        if self.best is None or not self.best.improves(row):
            return saved
        if not saved:
            self.save()
        self.best.mark(row, step, write=self.world.is_main)
        if self.world.is_main:  # the previous best may be past keep_last now
            ckpt.prune(self.best.root, self.cfg.trainer.keep_last, keep=f"step_{self._saved_step}")
        log.info("step %d: best %s so far (%.4f)", step, self.best.metric, self.best.value)
        return True

    def export_source(self, best: bool = True) -> tuple[Path, int]:
        """The checkpoint an export takes and its step: the best one (``trainer.keep_best``) when
        ``best`` and one is recorded, else the last saved."""
        if best and self.best is not None and self.best.step is not None:
            return self.run_dir / "checkpoints" / f"step_{self.best.step}", self.best.step
        return self.run_dir / "checkpoints" / f"step_{self._saved_step}", self._saved_step

    def _export(self) -> None:
        """``trainer.export_to``: the best (or final) checkpoint as a Hugging Face folder."""
        out = self.cfg.trainer.export_to
        if not out or not self.world.is_main:
            return
        source, _ = self.export_source()
        export_checkpoint(source, out)
        log.info("exported %s to %s (Hugging Face format)", source, out)

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]],
                   measure_grad_norm: bool = False) -> torch.Tensor | None:
        """One optimizer step over ``grad_accum_steps`` micro-batches; the step's loss per
        labelled token (on device), or None when the update was skipped or rolled back (see
        ``numerics``)."""
        self.optimizer.finetune.begin_step(self.progress.step)  # finetune.*: what trains now
        accum = self.cfg.trainer.grad_accum_steps
        micro_batches = self._micro_batches(batches, accum)
        if micro_batches is None:
            self.data_ended = True
            return None
        weights = self._token_weights(micro_batches)
        total = torch.zeros((), device=self.device)
        verdict = None
        for micro, (batch, weight) in enumerate(zip(micro_batches, weights, strict=True)):
            loss = self.forward_backward_step(batch, weight)
            total += loss.detach()
            armed = False
            if micro == accum - 1:
                verdict = self._judge(total / accum, self._own_grad_norm(measure_grad_norm))
                armed = self.optimizer.skip_next
            self.engine.step()
            self.optimizer.skip_next = False
            if micro == accum - 1 and not armed and self._deepspeed_skipped_it():
                verdict = self._deepspeed_skipped(self.progress.step + 1)
            if not (isinstance(weight, float) and weight == 0.0):  # not a stand-in (epochs)
                tokens = batch["input_ids"].numel() * self.world.world_size  # a shape: no sync
                self.throughput.add(tokens)
                self.progress.tokens_seen += tokens
        self.progress.step += 1
        if self.guard is not None:
            self.guard.settle(verdict, self.progress.step)
        keys, epochs = self.stream.pop_trace()  # host lists the loader handed over: no sync
        if self.trace:
            self.trace.write(self.progress.step, keys, epochs)
        if verdict is not None and verdict.spike and self.guard.policy == "rollback":
            self._rollback(verdict.loss)
            return None
        return None if verdict is not None and verdict.skip else total / accum

    def _micro_batches(self, batches: Any, count: int) -> list[dict[str, torch.Tensor]] | None:
        """The step's micro-batches; None when ``trainer.epochs`` are over on every rank."""
        if isinstance(batches, FiniteBatches):
            return batches.take(count)
        return [next(batches) for _ in range(count)]

    def _token_weights(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[Any]:
        """Each micro-batch's factor on its mean loss, so that a step's gradient is the sum of
        its token losses over the labelled tokens of the *whole step* — every micro-batch and
        rank — rather than a mean of per-micro-batch means, which over-weights the tokens of a
        sparsely labelled micro-batch (padding, masking, SFT). DeepSpeed divides by
        ``grad_accum_steps`` and averages over ranks: hence ``n · accum · world / N``. Counts are
        read from the host batches; across ranks they are summed by one small collective whose
        result stays on the device (no host sync). Full rows give factors of exactly 1."""
        counts = [int((b["labels"] != IGNORE).sum()) for b in micro_batches]
        share = len(micro_batches) * self.world.world_size
        if self.world.world_size == 1:
            total = max(1, sum(counts))
            return [n * share / total for n in counts]
        total = torch.tensor(float(sum(counts)), device=self.device)
        dist.all_reduce(total)
        total = total.clamp(min=1.0)
        return [float(n * share) / total if n else 0.0 for n in counts]

    def _own_grad_norm(self, for_logging: bool) -> torch.Tensor | None:
        """The gradient norm where DeepSpeed neither reports nor checks it (fp32 ZeRO-0), when
        the log or the non-finite check needs it; None elsewhere. The optimizer clips with it
        (``SkippableAdamW.grad_norm``): one norm per step."""
        if not self._engine_hides_grad_norm or not (for_logging or self.guard is not None):
            return None
        self._grad_norm = _total_grad_norm(self.engine.module)
        self.optimizer.grad_norm = self._grad_norm
        return self._grad_norm

    def _judge(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> Any:
        """Agree with the other ranks on this step's loss (and ``grad_norm``, where DeepSpeed
        does not check it); arm the optimizer to skip the update if either is not finite
        anywhere or the loss is a spike to roll back."""
        if self.guard is None:
            return None
        step = self.progress.step + 1
        verdict = self.guard.check(loss, step, grad_norm)
        if verdict.skip:
            self.progress.skipped_steps += 1
        if verdict.spike:
            log.warning("step %d: loss spike %.4f (policy %s)", step, verdict.loss,
                        self.guard.policy)
        self.optimizer.skip_next = verdict.skip or (verdict.spike
                                                    and self.guard.policy == "rollback")
        return verdict

    def _deepspeed_skipped_it(self) -> bool:
        """Whether DeepSpeed skipped the update it was just asked for on every rank: its global
        gradient check found a NaN or inf (ZeRO 1-3, bf16). fp16's loss-scaler overflows are
        routine and DeepSpeed's own business (it logs them and lowers the scale)."""
        return self.precision != "fp16" and not self.engine.was_step_applied()

    def _deepspeed_skipped(self, step: int) -> Verdict:
        """Count and say that DeepSpeed skipped this step for non-finite gradients."""
        self.progress.skipped_steps += 1
        log.warning("step %d: non-finite gradient norm: the update is skipped on all", step)
        return Verdict(math.nan, skip=True)

    def _rollback(self, loss: float) -> None:
        """Reload the last checkpoint but keep reading the data from here: the batches since
        that checkpoint, the spike's among them, are skipped."""
        step = self.progress.step
        found = ckpt.find_checkpoint(self.run_dir, "auto")
        if found is None or ckpt.resume_layout(found, self.world.world_size,
                                               self.cfg.deepspeed.zero_stage) != "same":
            log.warning("step %d: no checkpoint of this run's layout to roll back to; the "
                        "update was skipped", step)
            return
        state = ckpt.load_checkpoint(self.engine, found, self.world.rank)
        counters = {"skipped_steps": self.progress.skipped_steps,
                    "rollbacks": self.progress.rollbacks + 1}
        self.progress = Progress(**{**state["progress"], **counters})
        if self.sinks:
            self.sinks.go_back(ResumePoint.from_state(state), "rollback")
        log.warning("step %d: rolled back to %s after a loss spike (%.4f); the data since is "
                    "skipped", step, found.name, loss)

    def forward_backward_step(self, batch: dict[str, torch.Tensor],
                              weight: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Backward of the micro-batch's mean loss times ``weight`` (:meth:`_token_weights`);
        a micro-batch with no labelled token contributes zero (and still runs its backward,
        which ZeRO-3's hooks expect)."""
        if isinstance(weight, float) and weight == 0.0:
            loss = self._loss(batch, reduction="sum")  # 0, with its graph
        else:
            loss = self._loss(batch) * weight
        loss = self.faults.poison(loss, self.progress.step + 1, self.world.rank)
        self._micro_batches_since_log += 1
        self.engine.backward(loss)
        return loss

    def _loss(self, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
        """The objective's loss over the labelled positions (their mean, or sum); its parts
        (MLM + NSP) are summed for the log on the device."""
        outputs = self.engine(**model_inputs(batch, self.device, *self._chunked_loss))
        loss, parts = training_loss(outputs, batch, reduction)
        for name, value in parts.items():
            self._parts[name] = self._parts.get(name, 0.0) + value
        return loss

    # --- eval, logging, saving ----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean token loss over ``trainer.eval_steps`` held-out batches per rank, over all ranks."""
        self.engine.eval()
        sums: dict[str, torch.Tensor] = {}
        for batch in iter_eval_batches(
                self.eval_manifest, seq_len=self.cfg.data.seq_len,
                micro_batch_size=self.cfg.trainer.micro_batch_size, rank=self.world.rank,
                world_size=self.world.world_size, max_batches=self.cfg.trainer.eval_steps,
                objective=self.objective, io=self.stream.config.io):
            inputs = model_inputs(batch, self.device, *self._chunked_loss)
            batch_sums = eval_sums(self.engine(**inputs), batch)
            if self._byte_lengths is not None:
                batch_sums["bytes"] = label_bytes(batch["labels"], self._byte_lengths).to(
                    self.device)
            for name, value in batch_sums.items():
                sums[name] = sums[name] + value if name in sums else value
        self.engine.train()
        # a rank without eval data still joins, with the same sums as the others
        names = sorted(set(sums) | {"loss", "count"}
                       | ({"bytes"} if self._byte_lengths is not None else set()))
        totals = torch.stack([sums.get(n, torch.zeros((), device=self.device)) for n in names])
        if dist.is_initialized():
            dist.all_reduce(totals)
        summed = dict(zip(names, totals.tolist(), strict=True))
        if summed["count"] == 0:
            log.warning("eval: no held-out batches (is the eval split empty?)")
            return {}
        row = eval_metrics(summed) | self._eval_generate()
        if self.sinks:
            self.sinks.log({"step": self.progress.step, **row})
        return row

    def _eval_generate(self) -> dict[str, float]:
        """``trainer.eval_generate``'s numbers for the eval row (every rank runs it); its W&B
        table of answers is held with the row."""
        if self.gen_eval is None:
            return {}
        numbers, table = self.gen_eval.run(
            self.engine.module, self.tokenizer, main=self.world.is_main,
            lockstep=self.world.world_size > 1, device=self.device,
            template=self._template() if self.task == "sft" else None)
        wandb = self.sinks.wandb if self.sinks else None
        if wandb is not None and table:
            step = self.progress.step
            wandb.log_samples_table([{"step": step, **r} for r in table], TABLE_KEY, step)
        return numbers

    def _log_train(self, mean_loss: torch.Tensor) -> None:
        """The one place a training step syncs with the host: every ``log_every`` steps."""
        if dist.is_initialized():
            dist.all_reduce(mean_loss)
            mean_loss /= self.world.world_size
        loss = mean_loss.item()
        grad_norm = self._grad_norm if self._engine_hides_grad_norm \
            else self.engine.get_global_grad_norm()
        row = {"step": self.progress.step, "loss": loss, **self._pop_parts(),
               **({"epoch": self.epoch_plan.epoch(self.progress.step)} if self.epoch_plan
                  else {}),
               "lr": self.engine.get_lr()[0],
               "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "tokens_seen": self.progress.tokens_seen,
               "skipped_steps": self.progress.skipped_steps,
               "rollbacks": self.progress.rollbacks,
               **self.throughput.report(),
               "mem_gb": memory_gb(self.device), **self._data_metrics()}
        if not math.isfinite(loss):
            log.warning("step %d: non-finite loss %s", self.progress.step, loss)
        if self.sinks:
            self.sinks.log(row)

    def _pop_parts(self) -> dict[str, float]:
        """The mean of each loss part (MLM + NSP) since the last log, over all ranks."""
        if not self._parts:
            self._micro_batches_since_log = 0
            return {}
        names = sorted(self._parts)
        values = torch.stack([torch.as_tensor(self._parts[n], device=self.device) for n in names])
        values /= self._micro_batches_since_log
        if dist.is_initialized():
            dist.all_reduce(values)
            values /= self.world.world_size
        self._parts, self._micro_batches_since_log = {}, 0
        return dict(zip(names, values.tolist(), strict=True))

    def _data_metrics(self) -> dict[str, float]:
        """The stream's counters (skipped samples, tokens per mixture source) over all ranks."""
        local = self.stream.metrics()
        if dist.is_initialized():
            values = torch.tensor(list(local.values()), dtype=torch.float64, device=self.device)
            dist.all_reduce(values)
            local = dict(zip(local, values.tolist(), strict=True))
        return {k: int(v) for k, v in local.items()}

    def save(self) -> Path:
        rank_state = {"progress": vars(self.progress).copy(), "stream": self.stream.state_dict(),
                      "rng": ckpt.rng_state(),
                      **(self.sinks.state() if self.sinks else {}),
                      "weights_checksum": self._weights_checksum()}
        meta = {"step": self.progress.step, "model": {"family": self.cfg.model.family,
                                                       **vars(self.model_cfg)},
                "world_size": self.world.world_size,
                "zero_stage": self.cfg.deepspeed.zero_stage, "precision": self.precision,
                "seq_len": self.cfg.data.seq_len, "objective": self.objective.name,
                **({"labels": self.train_manifest.task["labels"]} if self.task == "cls" else {})}
        start = time.perf_counter()
        path = ckpt.save_checkpoint(self.engine, self.run_dir / "checkpoints", self.progress.step,
                                    self.world.rank, rank_state, meta,
                                    self.tokenizer, self.cfg.trainer.keep_last,
                                    publish_delay_s=self.faults.save_delay_s)
        log.info("saved %s in %.1fs", path, time.perf_counter() - start)
        if self.sinks:
            self.sinks.commit()  # the rows so far are durable now: a resume never repeats them
        self._saved_step = self.progress.step
        return path

    @torch.no_grad()
    def _weights_checksum(self) -> float:
        """Σ|w| over the full weights as this rank sees them (ZeRO 3 gathers them: a collective).

        Ranks must agree; a checkpoint and the run that resumes from it must agree too, whatever
        the world size or ZeRO stage — the check on a resume that re-splits the state."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for param in self.engine.module.parameters():
            with self._gathered(param):  # one parameter at a time: never the whole model
                total += torch.linalg.vector_norm(param, ord=1, dtype=torch.float64)
        return float(total)  # one host sync, at a save or a resume

    def _gathered(self, param: torch.nn.Parameter) -> contextlib.AbstractContextManager:
        """ZeRO 3 holds a partition of ``param``: gather it for the duration (a collective)."""
        if self.cfg.deepspeed.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([param])

    def _stop_on_signal(self, already_saved: bool) -> None:
        path = self.run_dir / "checkpoints" / f"step_{self.progress.step}"
        if not already_saved:
            path = self.save()
        raise Preempted(f"stopped by {self.signals.describe()} at step {self.progress.step} after "
                        f"saving {path}; run the same command again to resume")

    def sample(self, prompt: str, max_new_tokens: int) -> str:
        """Generate from the live model (every rank runs it: ZeRO-3 gathers weights collectively).

        A T5 model fills in a blank after the prompt: its input is the prompt, sentinel 0, EOS."""
        prompt_ids = self._prompt_ids(prompt)
        if self.objective.name == "span":
            prompt_ids += [self.tokenizer.sentinel_ids[0], self.tokenizer.eos_id]
        ids = torch.tensor([prompt_ids], device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.trainer.seed)
        self.engine.eval()
        out = generate(self.engine.module, ids, max_new_tokens, temperature=0.8, top_k=50,
                       eos_id=self.tokenizer.eos_id, generator=gen)
        self.engine.train()
        return self.tokenizer.decode(out[0].tolist())

    def _prompt_ids(self, prompt: str) -> list[int]:
        """``prompt`` as the model reads it: after SFT, rendered with the corpus's template."""
        if self.task != "sft":
            return self.tokenizer.encode(prompt)
        pieces = prompt_pieces(self._template(), prompt)
        return [i for piece in pieces for i in self.tokenizer.encode(piece)]

    def _template(self) -> Template:
        """The SFT corpus's template (how a prompt is rendered for the model)."""
        return make_template(self.train_manifest.task["template"] or "plain", self.tokenizer)

    def close(self) -> None:
        self.signals.restore()
        if self.trace:
            self.trace.close()
        if self.sinks:
            self.sinks.close()
