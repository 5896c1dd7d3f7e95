"""Weights & Biases: online with an API key, offline without one, the same run across resumes."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from megatrain.config.schema import WandbConfig
from megatrain.errors import ConfigError

log = logging.getLogger("megatrain")
MODES = ("auto", "online", "offline", "disabled")


def resolve_mode(mode: str) -> str:
    """``auto`` → online when an API key is configured, else offline (no network needed)."""
    if mode not in MODES:
        raise ConfigError(f"logger.wandb.mode={mode!r} is not one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online":
        return "online"
    netrc = Path.home() / ".netrc"
    has_login = netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    return "online" if has_login else "offline"


class WandbSink:
    def __init__(self, run: Any, mode: str, run_dir: Path) -> None:
        self.run = run
        self.mode = mode
        self.run_dir = run_dir

    @property
    def run_id(self) -> str:
        return self.run.id

    @classmethod
    def create(cls, cfg: WandbConfig, run_dir: Path, name: str, run_id: str | None,
               config: dict[str, Any]) -> WandbSink | None:
        mode = resolve_mode(cfg.mode)
        if mode == "disabled":
            return None
        import wandb

        run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, name=name,
                         id=run_id, resume="allow", mode=mode, dir=str(run_dir), config=config)
        log.info("wandb: %s run %s (%s)", mode, run.id, run.dir)
        return cls(run, mode, run_dir)

    def log(self, row: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step" and v is not None},
                     step=row["step"])

    def close(self) -> None:
        self.run.finish()
        if self.mode == "offline":
            log.info("wandb: offline run saved; upload it with `wandb sync %s`",
                     Path(self.run.dir).parent)
