"""``megatrain-train``: the Hydra app that trains a model.

    megatrain-train experiment=quickstart trainer.max_steps=200
    torchrun --nproc_per_node 8 -m megatrain.train model=gpt2-small deepspeed=zero2
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from megatrain.config import Config, register_configs
from megatrain.config.validate import check_ranges, normalize_overrides
from megatrain.errors import EXIT_OK, ConfigError, MegatrainError
from megatrain.launch.exit_status import record_exit
from megatrain.launch.sweep import prepare_sweep_job
from megatrain.launch.torchrun_job import in_submitit_job, run_sweep_job

if TYPE_CHECKING:
    from megatrain.training.trainer import Trainer

log = logging.getLogger("megatrain")


def run(cfg: DictConfig) -> dict[str, float]:
    """Train with a composed config; returns the final eval metrics."""
    check_ranges(cfg, Config)  # before any process group, model or data exists
    from megatrain.distributed import detect_world, init_distributed
    from megatrain.logging import setup_console_logging

    world = detect_world()
    setup_console_logging(world.rank)
    device = init_distributed(world, cfg.trainer.collective_timeout_s)
    from megatrain.training.faults import StopSignals
    from megatrain.training.trainer import Trainer  # imports DeepSpeed: after DS_ACCELERATOR

    signals = StopSignals()  # before the slow set-up, so an early SIGTERM / SIGUSR1 is kept

    run_dir = Path(cfg.run.dir)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    trainer = Trainer(cfg, world, device, signals)
    try:
        result = _train(trainer)
        _report(trainer, result)
        if cfg.trainer.sample_prompt:
            text = trainer.sample(cfg.trainer.sample_prompt, cfg.trainer.sample_tokens)
            if world.is_main:
                print(f"\n----- sample (prompt {cfg.trainer.sample_prompt!r}) -----\n{text}\n"
                      "-----", flush=True)
    finally:
        trainer.close()
    return result


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


def _report(trainer: Trainer, result: dict[str, float]) -> None:
    if not trainer.world.is_main or not result:
        return
    entropy = trainer.train_manifest.stats.get("unigram_entropy")
    baseline = f" (unigram entropy of the corpus: {entropy:.3f})" if entropy else ""
    log.info("done: step %d, eval loss %.4f, perplexity %.2f%s; run folder %s",
             trainer.progress.step, result["eval_loss"], result["eval_ppl"], baseline,
             trainer.run_dir)


@hydra.main(version_base=None, config_path="pkg://megatrain.configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    prepare_sweep_job(cfg)
    if in_submitit_job():  # a sweep job on SLURM: start this job's ranks, never be one
        return run_sweep_job(cfg)
    try:
        result = run(cfg)
    except MegatrainError as err:
        print(f"{err.label}: {err}", file=sys.stderr, flush=True)
        record_exit(err.exit_code, f"{err.label}: {err}")
        sys.exit(err.exit_code)
    except Exception as err:
        record_exit(1, f"crashed: {type(err).__name__}: {err}")
        raise
    record_exit(EXIT_OK, "done", result)
    return result.get("eval_loss")  # what a Hydra sweep optimises


def main() -> None:
    try:
        sys.argv[1:] = normalize_overrides(sys.argv[1:])  # Hydra reads them from there
    except ConfigError as err:
        print(f"{err.label}: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
