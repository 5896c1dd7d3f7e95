"""Checkpoint bookkeeping that needs no engine: retention, ``latest``, path resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatrain.errors import ConfigError
from megatrain.training.checkpoint import _prune, find_checkpoint, resolve_checkpoint_path


def _fake_checkpoints(root: Path, steps: list[int]) -> None:
    root.mkdir(parents=True)
    for step in steps:
        (root / f"step_{step}").mkdir()
        (root / f"step_{step}" / "meta.json").write_text(json.dumps({"step": step}))


def test_prune_keeps_the_newest_and_drops_partial_saves(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _fake_checkpoints(root, [10, 20, 30, 100])
    (root / "step_110.tmp").mkdir()
    _prune(root, keep_last=2, keep="step_100")
    assert sorted(p.name for p in root.iterdir()) == ["step_100", "step_30"]
    _prune(root, keep_last=0, keep="step_100")  # keep_last below 1 still keeps the newest
    assert sorted(p.name for p in root.iterdir()) == ["step_100"]


def test_find_checkpoint_follows_latest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert find_checkpoint(run, "auto") is None
    _fake_checkpoints(run / "checkpoints", [5, 7])
    (run / "checkpoints" / "latest").write_text("step_5")
    assert find_checkpoint(run, "auto") == run / "checkpoints" / "step_5"
    assert find_checkpoint(run, "never") is None
    assert find_checkpoint(run, str(run / "checkpoints" / "step_7")).name == "step_7"
    assert resolve_checkpoint_path(run).name == "step_5"


def test_a_folder_that_is_no_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path)):
        resolve_checkpoint_path(tmp_path)
