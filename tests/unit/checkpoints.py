"""A checkpoint as the trainer writes it at ZeRO stage 0, minus optimizer and per-rank state,
for tests of what reads checkpoints (export, generate, init_from)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from megatrain.data.tokenizer import load_tokenizer
from megatrain.training.checkpoint import LATEST, write_manifest


def write_stage0_checkpoint(ckpt: Path, family: str, model: torch.nn.Module, tokenizer: Path,
                            step: int = 7) -> Path:
    """``ckpt`` (a step folder) with meta.json, the weights, the tokenizer and a manifest; its
    parent's ``latest`` names it."""
    ckpt.mkdir(parents=True)
    meta = {"model": {"family": family, **dataclasses.asdict(model.config)}, "zero_stage": 0,
            "world_size": 1, "step": step}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    torch.save({"module": model.state_dict()}, ckpt / "mp_rank_00_model_states.pt")
    load_tokenizer(tokenizer).save(ckpt)
    write_manifest(ckpt)
    (ckpt.parent / LATEST).write_text(ckpt.name)
    return ckpt
