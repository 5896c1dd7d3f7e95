"""Checkpoints: DeepSpeed's engine state plus ours (RNGs, stream position, counters).

Layout of ``<run.dir>/checkpoints``::

    step_<N>/            DeepSpeed's files (model, optimizer, schedule), rank<R>.pt (per-rank
                         RNGs and stream position), meta.json, tokenizer.model
    latest               the name of the newest *complete* checkpoint

A checkpoint is written under ``step_<N>.tmp`` and renamed once every rank has finished, and
only then does ``latest`` move (atomically), so ``latest`` never names a partial checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatrain.errors import ConfigError

log = logging.getLogger("megatrain")
LATEST = "latest"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine: Any, root: Path, step: int, rank: int, rank_state: dict[str, Any],
                    meta: dict[str, Any], tokenizer_path: Path, keep_last: int) -> Path:
    """Save on every rank (collective); returns the published checkpoint directory."""
    tag, tmp_tag = f"step_{step}", f"step_{step}.tmp"
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"step": step},
                           save_latest=False)
    tmp = root / tmp_tag
    torch.save(rank_state, tmp / f"rank{rank}.pt")
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    _barrier()
    if rank == 0:
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, tag)
        _prune(root, keep_last, keep=tag)
    _barrier()
    return root / tag


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete the oldest complete checkpoints beyond ``keep_last`` (never ``keep``) and leftovers
    of interrupted saves."""
    for partial in root.glob("step_*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)
    done = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name.split("_")[1].isdigit()),
                  key=_step_of)
    for old in done[: max(0, len(done) - max(1, keep_last))]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint ``run.resume`` asks for: ``auto`` → latest in run_dir (or none),
    ``never`` → none, else a path to a checkpoint or to a run / checkpoints folder."""
    if resume == "never":
        return None
    if resume == "auto":
        latest = run_dir / "checkpoints" / LATEST
        return run_dir / "checkpoints" / latest.read_text().strip() if latest.exists() else None
    return resolve_checkpoint_path(Path(resume))


def resolve_checkpoint_path(path: Path) -> Path:
    """Accept a checkpoint folder, a ``checkpoints`` folder or a run folder."""
    for root in (path, path / "checkpoints"):
        if (root / LATEST).exists():
            return root / (root / LATEST).read_text().strip()
    if (path / "meta.json").exists():
        return path
    raise ConfigError(f"{path} is not a megatrain checkpoint, checkpoints folder or run folder "
                      "(no meta.json or 'latest' found)")


def read_meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))


def load_checkpoint(engine: Any, ckpt: Path, rank: int, world_size: int) -> dict[str, Any]:
    """Restore the engine from ``ckpt`` and return this rank's own state (RNGs, stream...)."""
    meta = read_meta(ckpt)
    if meta["world_size"] != world_size:
        raise ConfigError(f"{ckpt} was written by {meta['world_size']} rank(s); resuming on "
                          f"{world_size} is not supported yet: use {meta['world_size']}")
    path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load the checkpoint {ckpt}")
    return torch.load(ckpt / f"rank{rank}.pt", weights_only=False)


def load_model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full model state dict from a checkpoint of any ZeRO stage, in fp32, on the CPU."""
    meta = read_meta(ckpt)
    if meta.get("zero_stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}
