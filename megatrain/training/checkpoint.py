"""Checkpoints: DeepSpeed's engine state plus ours (RNGs, stream position, counters).

Layout of ``<run.dir>/checkpoints``::

    step_<N>/            DeepSpeed's files (model, optimizer, schedule), rank<R>.pt (per-rank
                         RNGs and stream position), meta.json, the corpus tokenizer
                         (tokenizer.model, or tokenizer.json + its tokenizer_config.json;
                         checkpoints before 2026-12 hold either as tokenizer.model)
    latest               the name of the newest *complete* checkpoint

A checkpoint is written under ``step_<N>.tmp``. Once every rank has finished, rank 0 lists
every file with its size and sha256 in ``MANIFEST.json``, renames the folder and only then moves
``latest`` (atomically), so ``latest`` never names a partial checkpoint. Loading verifies the
manifest and that every ``.pt`` file loads as data only (:mod:`megatrain.training.safe_load`: a
pickle must not run code); ``run.resume=auto`` falls back to the newest older checkpoint that
verifies, saying so. A save that fails (a full disk, an I/O error) removes its partial folder
and raises :class:`CheckpointError`: the previous checkpoint stays intact and ``latest``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatrain.data.manifest import sha256_file
from megatrain.data.tokenizer import Tokenizer
from megatrain.errors import ConfigError, MegatrainError
from megatrain.training import safe_load
from megatrain.training.best import best_tag

log = logging.getLogger("megatrain")
LATEST = "latest"
MANIFEST = "MANIFEST.json"


class CheckpointError(MegatrainError):
    """A save failed (the previous checkpoint is intact) or no checkpoint verifies."""


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
                    meta: dict[str, Any], tokenizer: Tokenizer, keep_last: int,
                    publish_delay_s: float = 0.0) -> Path:
    """Save on every rank (collective); returns the published checkpoint directory.

    ``publish_delay_s`` (fault-injection tests only) widens the window between writing and
    publishing."""
    tag, tmp = f"step_{step}", root / f"step_{step}.tmp"
    try:
        engine.save_checkpoint(str(root), tag=tmp.name, client_state={"step": step},
                               save_latest=False)
        torch.save(rank_state, tmp / f"rank{rank}.pt")
        if rank == 0:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
            tokenizer.save(tmp)
        failure = None
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        free_mb = shutil.disk_usage(root).free / 2**20
        failure = (f"rank {rank}: {err}; {free_mb:.0f} MB free there — a full disk, a quota or "
                   "a file-size limit?")
    time.sleep(publish_delay_s)
    if _any_rank_failed(failure is not None, engine.device):
        _abandon(root, tmp, rank, failure)
    if rank == 0:
        _publish(root, tmp, tag, keep_last)
    _barrier()
    return root / tag


def _any_rank_failed(failed: bool, device: torch.device) -> bool:
    """Whether any rank's writes failed (a collective: every rank learns it)."""
    flag = torch.tensor([int(failed)], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _abandon(root: Path, tmp: Path, rank: int, failure: str | None) -> None:
    """Remove the partial save and raise, naming the checkpoint that is still ``latest``."""
    _barrier()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    latest = root / LATEST
    kept = latest.read_text().strip() if latest.exists() else None
    still = f"{kept} is intact and still {LATEST}" if kept else "there is no earlier checkpoint"
    raise CheckpointError(f"saving {tmp.name.removesuffix('.tmp')} to {root} failed "
                          f"({failure or 'on another rank'}); {still}")


def _publish(root: Path, tmp: Path, tag: str, keep_last: int) -> None:
    """Rank 0, after every rank wrote: manifest, rename, durable ``latest``, retention."""
    write_manifest(tmp)
    final = root / tag
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST, tag)
    prune(root, keep_last, keep=tag)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(ckpt: Path) -> None:
    """``MANIFEST.json``: every file of the checkpoint with its size and sha256, fsynced."""
    files = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST}
    with (ckpt / MANIFEST).open("w", encoding="utf-8") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be trusted (a missing, truncated or altered file, or a file that
    would run code when loaded: :func:`safe_load.check_pickles`), or None."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return f"{MANIFEST} is missing (an incomplete or foreign checkpoint)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, expected in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its sha256"
    return safe_load.check_pickles(ckpt)


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete the oldest complete checkpoints beyond ``keep_last`` (never ``keep`` nor the best
    one that ``best.json`` names) and leftovers
    of interrupted saves."""
    for partial in root.glob("step_*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)
    done = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name.split("_")[1].isdigit()),
                  key=_step_of)
    kept = {keep, best_tag(root)}  # the one just published, and trainer.keep_best's
    for old in done[: max(0, len(done) - max(1, keep_last))]:
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint ``run.resume`` asks for: ``auto`` → latest in run_dir (or none),
    ``never`` → none, else a path to a checkpoint or to a run / checkpoints folder."""
    if resume == "never":
        return None
    if resume == "auto":
        return _newest_valid(run_dir / "checkpoints")
    path = resolve_checkpoint_path(Path(resume))
    problem = verify_checkpoint(path)
    if problem:
        raise CheckpointError(f"run.resume={resume}: {path} is corrupt: {problem}")
    return path


def _newest_valid(root: Path) -> Path | None:
    """``latest`` if it verifies, else the newest older checkpoint that does (with a warning);
    None when there is no checkpoint at all."""
    latest = root / LATEST
    if not latest.exists():
        return None
    newest = root / latest.read_text().strip()
    older = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()
                    and p != newest), key=_step_of, reverse=True)
    for candidate in (newest, *older):
        problem = verify_checkpoint(candidate) if candidate.exists() else "it does not exist"
        if problem is None:
            return candidate
        log.warning("checkpoint %s is not usable (%s); trying the one before", candidate, problem)
    raise CheckpointError(f"no checkpoint in {root} verifies (see the warnings above); "
                          "set run.resume=never to start over")


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


UNIVERSAL = "universal"


def _has_zero_partitions(ckpt: Path) -> bool:
    """Whether DeepSpeed split the optimizer state over ranks (ZeRO 1-3, or bf16 at stage 0)."""
    return any(ckpt.glob("*zero_pp_rank_*_optim_states.pt"))


def resume_layout(ckpt: Path, world_size: int, zero_stage: int) -> str:
    """How to load ``ckpt`` into ``world_size`` ranks at ``zero_stage``:

    ``same`` (the layout it was written with), ``replicated`` (ZeRO 0 in fp32 keeps the full
    optimizer state in one file: any world size loads it as is) or ``universal`` (partitions
    are re-split through DeepSpeed's universal checkpoint). ConfigError for what cannot work.
    """
    meta = read_meta(ckpt)
    before = (meta["world_size"], meta.get("zero_stage", 0))
    if before == (world_size, zero_stage):
        return "same"
    change = (f"{ckpt} was written by {before[0]} rank(s) at ZeRO {before[1]}; this run has "
              f"{world_size} at ZeRO {zero_stage}")
    if not _has_zero_partitions(ckpt):
        if zero_stage == 0:
            return "replicated"
        raise ConfigError(f"{change}: a ZeRO-0 checkpoint resumes at ZeRO 0 only (on any number "
                          "of ranks); set deepspeed.zero_stage=0")
    if zero_stage == 0:
        raise ConfigError(f"{change}: a partitioned optimizer state cannot be loaded at ZeRO 0; "
                          "use deepspeed.zero_stage=1, 2 or 3")
    log.info("%s: re-splitting it through a universal checkpoint", change)
    return UNIVERSAL


def universal_checkpoint(ckpt: Path, rank: int) -> Path:
    """``ckpt/universal``: DeepSpeed's layout-free form of ``ckpt``, converted once by rank 0
    (into a temporary folder, then renamed) while the other ranks wait."""
    out = ckpt / UNIVERSAL
    if rank == 0 and not out.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = ckpt / f"{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(tmp),
                                  num_extract_workers=1, num_merge_workers=1,
                                  keep_temp_folder=False, strict=True, inject_missing_state=True)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # its progress report, not ours
            ds_to_universal.main(args)
        _loadable_at_every_stage(tmp)
        os.replace(tmp, out)
        log.info("converted %s to a universal checkpoint in %.1fs", ckpt, time.perf_counter() - start)
    _barrier()
    return out


def _loadable_at_every_stage(universal: Path) -> None:
    """DeepSpeed writes a universal checkpoint in the form its source stage reads back; make it
    readable by ZeRO 1-2 and ZeRO 3 alike (so a run can also change stage):

    - the model states file (metadata only here) under its plain and its ZeRO-3 name;
    - ``zero/optimizer_state.pt`` with the param groups both at the top (ZeRO 1-2) and in an
      ``optimizer_state_dict`` with the step (ZeRO 3), the step read from any parameter.
    """
    names = [universal / "mp_rank_00_model_states.pt",
             universal / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    present = [n for n in names if n.exists()]
    for name in names:
        if present and not name.exists():
            os.link(present[0], name)
    path = universal / "zero" / "optimizer_state.pt"
    state = safe_load.load(path)
    if "optimizer_state_dict" not in state:
        step = safe_load.load(next((universal / "zero").glob("*/step.pt")))
        state["optimizer_state_dict"] = {"state": {0: {"step": step}},
                                         "param_groups": state["param_groups"]}
    state.setdefault("param_groups", state["optimizer_state_dict"]["param_groups"])
    torch.save(state, path)


def load_checkpoint(engine: Any, ckpt: Path, rank: int, layout: str = "same") -> dict[str, Any]:
    """Restore the engine from ``ckpt`` (see :func:`resume_layout`) and return this rank's own
    state (RNGs, stream position, counters); a new rank beyond the old world size takes the last
    old rank's."""
    directory, tag = (ckpt, UNIVERSAL) if layout == UNIVERSAL else (ckpt.parent, ckpt.name)
    path, _ = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load the checkpoint {ckpt}")
    old_ranks = read_meta(ckpt)["world_size"]
    return safe_load.load(ckpt / f"rank{min(rank, old_ranks - 1)}.pt")


def stream_states(ckpt: Path) -> list[dict[str, Any]]:
    """Every saving rank's data stream state (from its ``rank<R>.pt``), in rank order.

    Elastic-resume hook: a rank resuming on a different world size or worker count passes this
    list to ``TrainStream.load_state_dict``, which re-splits the old ranks' remaining work; an
    engine that can load a checkpoint of another world size needs nothing else for the data.
    """
    size = read_meta(ckpt)["world_size"]
    return [safe_load.load(ckpt / f"rank{r}.pt")["stream"] for r in range(size)]


def load_model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full model state dict from a checkpoint of any ZeRO stage, in fp32, on the CPU;
    CheckpointError if the checkpoint does not verify."""
    problem = verify_checkpoint(ckpt)
    if problem:
        raise CheckpointError(f"{ckpt} is corrupt: {problem}")
    meta = read_meta(ckpt)
    if meta.get("zero_stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    states = safe_load.load(ckpt / "mp_rank_00_model_states.pt")
    return {k: v.float() for k, v in states["module"].items()}
