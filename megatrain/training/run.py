"""One training run from a composed config: the world, the run folder, the trainer, the final
report and sample. ``megatrain-train`` (``megatrain.cli.train``) is the Hydra layer over it."""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from megatrain.config.schema import Config
from megatrain.config.validate import check_engine_setup, check_locations, check_ranges
from megatrain.errors import ConfigError, MegatrainError
from megatrain.training.schedule import lr_multiplier_of

if TYPE_CHECKING:
    from megatrain.metrics.wandb_sink import WandbSink
    from megatrain.training.trainer import Trainer

log = logging.getLogger("megatrain")


def run_training(cfg: DictConfig, config: Config) -> dict[str, float]:
    """Train with a composed config ``cfg``, ``config`` its typed form from ``checked_config``
    (called once, before the run record is written); returns the final eval metrics."""
    from megatrain.distributed import detect_world, init_distributed, shutdown_distributed
    from megatrain.metrics import setup_console_logging

    world = detect_world()
    setup_console_logging(world.rank)
    device = init_distributed(world, config.trainer.collective_timeout_s)
    if device.type == "cpu":
        from megatrain.training.host_memory import keep_freed_memory

        keep_freed_memory()
    from megatrain.training.signals import StopSignals
    from megatrain.training.trainer import Trainer  # imports DeepSpeed: after DS_ACCELERATOR

    signals = StopSignals()  # before the slow set-up, so an early SIGTERM / SIGUSR1 is kept

    run_dir = Path(config.run.dir)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    trainer = Trainer(config, world, device, signals)
    try:
        result = _train(trainer)
        _report(trainer, result)
        prompt = config.trainer.sample_prompt
        if prompt:
            text = trainer.sample(prompt, config.trainer.sample_tokens)
            if world.is_main:
                print(f"\n----- sample (prompt {prompt!r}) -----\n{text}\n"
                      "-----", flush=True)
                _log_sample_table(trainer, prompt, text)
        _log_model(trainer)
    finally:
        trainer.close()
    shutdown_distributed()
    return result


def checked_config(cfg: DictConfig) -> Config:
    """The typed config, once every range and every rule across keys holds: a bad value fails
    here, before any process group, model or data exists."""
    check_ranges(cfg, Config)
    config: Config = OmegaConf.to_object(cfg)
    ds = config.deepspeed
    check_engine_setup(ds.zero_stage, ds.offload_optimizer, ds.offload_param,
                       config.trainer.precision)
    lr_multiplier_of(config)  # refuses a schedule that cannot run
    check_locations(config.data)
    check_wandb_extras(config)
    check_eval_generate(config)
    return config


def check_eval_generate(config: Config) -> None:
    """``trainer.eval_generate``: its task, rows file and fields, scorer, and a model family
    that generates (the trainer reads the rows again when it starts)."""
    from megatrain.eval.during_training import GenerationEval

    GenerationEval.build(config.trainer.eval_generate, config.model.family)


def check_wandb_extras(config: Config) -> None:
    """``logger.wandb.log_model`` / ``sample_table`` name something the run will have."""
    from megatrain.metrics.wandb_sink import log_model_choice

    wandb = config.logger.wandb
    choice = log_model_choice(wandb.log_model)
    if choice == "best" and not config.trainer.keep_best:
        raise ConfigError("logger.wandb.log_model=best needs trainer.keep_best (the eval metric "
                          "that picks the best checkpoint)")
    if choice and importlib.util.find_spec("transformers") is None:
        raise ConfigError(f"logger.wandb.log_model={choice} logs a Hugging Face export, which "
                          "needs transformers: pip install 'megatrain[hf]'")
    if wandb.sample_table and not config.trainer.sample_prompt:
        raise ConfigError("logger.wandb.sample_table=true logs the end-of-run sample: set "
                          "trainer.sample_prompt")


class PeerFailure(MegatrainError):
    """A collective failed or timed out: another rank died or stalls."""


def _train(trainer: Trainer) -> dict[str, float]:
    """``trainer.train()``, with a failed collective reported as what it almost always is."""
    import torch.distributed as dist

    try:
        return trainer.train()
    except (dist.DistError, RuntimeError) as err:
        text = str(err)
        if not isinstance(err, dist.DistError) and not any(
                word in text for word in ("gloo", "NCCL", "Timed out", "timed out")):
            raise
        raise PeerFailure(f"rank {trainer.world.rank}: a collective failed ({text.strip()[:300]}); "
                          "another rank died or stalled for longer than "
                          f"trainer.collective_timeout_s={trainer.cfg.trainer.collective_timeout_s}"
                          "; its log says why") from err


def _wandb(trainer: Trainer) -> WandbSink | None:
    return trainer.sinks.wandb if trainer.sinks else None  # the main rank's, when enabled


def _log_sample_table(trainer: Trainer, prompt: str, text: str) -> None:
    """``logger.wandb.sample_table``: the end-of-run sample as a W&B table."""
    sink = _wandb(trainer)
    if sink is not None and trainer.cfg.logger.wandb.sample_table:
        sink.log_samples_table([{"step": trainer.progress.step, "prompt": prompt, "text": text}])


def _log_model(trainer: Trainer) -> None:
    """``logger.wandb.log_model``: the Hugging Face export of the final or best checkpoint as a
    W&B artifact — ``trainer.export_to``'s folder when it holds that checkpoint, else an export
    made for it in the run folder and removed once W&B has staged its files."""
    from megatrain.metrics.wandb_sink import log_model_choice

    choice = log_model_choice(trainer.cfg.logger.wandb.log_model)
    sink = _wandb(trainer)
    if choice is None or sink is None:
        return
    source, step = trainer.export_source(best=choice == "best")
    meta = {"checkpoint": str(source), "step": step,
            "run": trainer.cfg.run.name, "family": trainer.cfg.model.family,
            **({"metric": trainer.best.metric, "value": trainer.best.value}
               if trainer.best and step == trainer.best.step else {})}
    aliases = [choice, f"step-{step}"]
    export_to = trainer.cfg.trainer.export_to
    if export_to and trainer.export_source()[0] == source:  # what Trainer._export wrote there
        sink.log_model(Path(export_to), aliases, meta)
        return
    from megatrain.hf_export import export

    with tempfile.TemporaryDirectory(prefix="hf_export.", dir=trainer.run_dir) as tmp:
        sink.log_model(export(source, tmp), aliases, meta)


def _report(trainer: Trainer, result: dict[str, float]) -> None:
    if not trainer.world.is_main or not result:
        return
    entropy = trainer.train_manifest.stats.get("unigram_entropy")
    baseline = f" (unigram entropy of the corpus: {entropy:.3f})" if entropy else ""
    scores = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in result.items())
    log.info("done: step %d, eval %s%s; run folder %s", trainer.progress.step, scores, baseline,
             trainer.run_dir)
