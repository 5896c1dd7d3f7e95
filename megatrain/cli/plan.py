"""``megatrain-plan``: how much memory a training setup needs per GPU, before launching it.

    megatrain-plan model=gpt2-small deepspeed=zero2 trainer.micro_batch_size=8 data.seq_len=1024 \
        --world-size 8 --gpu-gb 80

Takes the same Hydra overrides as ``megatrain-train`` (composed from the shipped configs, checked
against the schema), builds the model on the meta device (no memory, no GPU) and prints the plan
of ``megatrain.training.memory_plan``. Exit codes: 0 with a plan (whether or not it fits), 2 when the
configuration is wrong.
"""

from __future__ import annotations

import argparse
import sys

from megatrain.cli.common import run_command
from megatrain.config.compose import compose_config
from megatrain.config.schema import Config
from megatrain.config.validate import DEVICE_CHOSEN_PRECISIONS
from megatrain.errors import EXIT_OK, ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatrain-plan",
        description="Per-GPU memory (parameters, gradients, optimizer states, activations) of a "
                    "megatrain-train setup, and whether it fits a GPU. Figures are estimates.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides, as megatrain-train takes them")
    parser.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (GPUs)")
    parser.add_argument("--gpu-gb", type=float, default=None,
                        help="memory of one GPU in GB (1e9 bytes) to check the plan against")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="itemise every row (what DeepSpeed allocates)")
    return parser


def _notes(cfg: Config) -> list[str]:
    """What the plan assumed that the config left open."""
    vocab = cfg.model.vocab_size
    notes = [f"vocabulary: {vocab or cfg.data.vocab_size} "
             + ("(model.vocab_size)" if vocab else
                "(data.vocab_size; set model.vocab_size to your tokenizer's)")]
    if cfg.model.init_from:
        notes.append("model.init_from is not read: the plan uses model.size and its dims")
    if cfg.trainer.precision in DEVICE_CHOSEN_PRECISIONS:
        notes.append(f"trainer.precision={cfg.trainer.precision}: bf16 assumed (a GPU that has it)")
    return notes


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(lambda: _plan(args), label="config error")


def _plan(args: argparse.Namespace) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from megatrain.training.memory_plan import format_plan, plan_from_config

    if args.gpu_gb is not None and args.gpu_gb <= 0:
        raise ConfigError(f"--gpu-gb {args.gpu_gb} must be positive")
    try:
        cfg = compose_config(args.overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(str(err)) from err
    print(format_plan(plan_from_config(cfg, args.world_size, args.gpu_gb), args.verbose))
    for note in _notes(cfg):
        print(f"note: {note}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
