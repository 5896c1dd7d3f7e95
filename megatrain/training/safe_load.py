"""Checkpoint files are read as data, never as code.

A ``.pt`` file is a pickle, and unpickling may call any function it names (``os.system``), so a
checkpoint from elsewhere could run code on resume or ``model.init_from``. We load our own files
with ``torch.load(weights_only=True)``, which builds tensors and plain containers only, plus the
few classes :func:`allowed_globals` names. DeepSpeed loads its files with
``weights_only=False``, so :func:`check_pickles` (called by ``verify_checkpoint``) first loads
every ``.pt`` file of a checkpoint the same safe way and refuses the checkpoint if one needs
anything else. A manifest's sha256s cannot help here: whoever wrote the files writes matching
ones.
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


@functools.cache
def allowed_globals() -> tuple[Any, ...]:
    """What megatrain's and DeepSpeed's checkpoint files hold beyond torch's tensors and plain
    containers (found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` and data-only
    loads of real checkpoints: ZeRO 0-3, fp32 and bf16, 1 and 2 ranks, and their universal form).
    DeepSpeed is imported here, not with this module: ``distributed.py`` picks its accelerator
    before DeepSpeed is first imported."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return (
        # rank<R>.pt: numpy's RNG state, a uint32 array (its dtype is rebuilt as its own class)
        _reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
        # DeepSpeed's ZeRO 1-3 optimizer files and universal/zero/optimizer_state.pt: the loss
        # scaler (a static one in fp32 and bf16; fp16 keeps a dynamic one) and the ZeRO stage
        LossScaler, DynamicLossScaler, ZeroStageEnum,
        # ZeRO 1-2 optimizer files: where each parameter lies in the flat partition
        fragment_address,
    )


def load(path: Path | str) -> Any:
    """``torch.load`` of a checkpoint file on the CPU as data only (see :func:`allowed_globals`)."""
    with torch.serialization.safe_globals(list(allowed_globals())):
        return torch.load(path, map_location="cpu", weights_only=True)


def _pickle_files(ckpt: Path) -> Iterator[Path]:
    """Every ``*.pt`` file under ``ckpt``, through symlinked folders too (DeepSpeed follows them),
    each real folder once."""
    seen: set[str] = set()
    for folder, dirs, files in os.walk(ckpt, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort()
        yield from (Path(folder, name) for name in sorted(files) if name.endswith(".pt"))


def _refusal(path: Path, name: Path, err: Exception) -> str:
    """Why ``path`` (shown as ``name``) cannot be loaded as data: the globals it names that are
    not allowed, else the unpickler's own reason without torch's generic advice around it."""
    if not zipfile.is_zipfile(path):
        return (f"{name} is not a zip file as torch.save writes it, so it cannot be loaded as "
                "data only: megatrain refuses it")
    try:
        unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - a damaged file: the load's own reason says more
        unsafe = []
    if unsafe:
        return (f"{name} would run code when loaded (it references {', '.join(unsafe)}, which "
                "is not allowed): megatrain loads checkpoints as data only")
    text = str(err)
    _, marker, after = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (after if marker else text).splitlines()]
    advice = ("Weights only load failed", "Check the documentation")
    reason = next((line for line in lines if line and not line.startswith(advice)),
                  type(err).__name__)
    return f"{name} cannot be loaded as data only ({reason}): megatrain refuses it"


def check_pickles(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be loaded as data only (a ``.pt`` file under it, ``universal/``
    included, that would run code or is no torch file), or None. Tensor data is mapped, not
    read."""
    with torch.serialization.safe_globals(list(allowed_globals())):
        for path in _pickle_files(ckpt):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # noqa: BLE001 - whatever stops a data-only load refuses it
                return _refusal(path, path.relative_to(ckpt), err)
    return None
