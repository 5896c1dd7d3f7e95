"""Weights & Biases: online with an API key, offline without one, the same run across resumes,
and one row per step — the surviving timeline's — whatever rollbacks and crashes happen.

A row is sent to W&B only once it is durable: when a checkpoint taken after it is published
(``commit``), or when the run completes. A resume or a rollback repeats only steps after its
checkpoint, which W&B has then never seen, so W&B never holds a step it would have to forget.
What W&B holds is read back from its own transaction logs (``wandb_log``) and, online, from the
server's resume answer; rows it lost (a killed process loses its unwritten log blocks) are sent
again from ``metrics.jsonl``. Only when W&B holds steps past the point a run goes back to (a
resume from an older checkpoint than the last one) does it start a new W&B run, forked from the
old one at that step: the surviving rows are replayed into it, and the old run is left as it was.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from megatrain.config.schema import WandbConfig
from megatrain.errors import ConfigError
from megatrain.metrics import wandb_log

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


LOG_MODEL = ("false", "final", "best")


def log_model_choice(value: str) -> str | None:
    """``logger.wandb.log_model`` as ``final`` / ``best``, or None when off (YAML's ``false``
    arrives as the string ``"False"``)."""
    choice = str(value).lower()
    if choice not in LOG_MODEL:
        raise ConfigError(f"logger.wandb.log_model={value!r} is not one of {', '.join(LOG_MODEL)}")
    return None if choice == "false" else choice


def samples_table(rows: list[dict[str, Any]]) -> Any:
    """``rows`` as a ``wandb.Table``: one column per key, in the order keys first appear."""
    import wandb

    columns = list(dict.fromkeys(key for row in rows for key in row))
    return wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])


class WandbSink:
    """Holds rows back until they are durable, then sends them to the W&B run."""

    def __init__(self, cfg: WandbConfig, mode: str, run_dir: Path, name: str,
                 config: dict[str, Any]) -> None:
        self.cfg, self.mode, self.run_dir, self.name, self.config = cfg, mode, run_dir, name, config
        self.run: Any = None
        self.held: list[dict[str, Any]] = []  # logged since the last commit
        self.through = 0  # the highest step this W&B run may hold (sent, or held by W&B)
        self.skip_through = 0  # steps W&B held when this timeline began: never sent again

    @property
    def run_id(self) -> str:
        return self.run.id

    @classmethod
    def create(cls, cfg: WandbConfig, run_dir: Path, name: str, config: dict[str, Any],
               run_id: str | None, step: int, surviving: list[dict[str, Any]],
               fork: bool = False) -> WandbSink | None:
        """The sink of a run starting (or resuming at ``step``, continuing W&B run ``run_id``, or
        with ``fork`` a new run forked from it there) whose surviving rows so far are
        ``surviving``; None when W&B is disabled."""
        mode = resolve_mode(cfg.mode)
        if mode == "disabled":
            return None
        sink = cls(cfg, mode, run_dir, name, config)
        if fork and run_id is not None:
            sink._init(None, forked_from=f"{run_id}?_step={step}")
        else:
            sink._init(run_id)
            if run_id is not None:
                sink.through = sink._held_by_wandb()
        sink.go_back(step, surviving)
        return sink

    def _init(self, run_id: str | None, forked_from: str | None = None) -> None:
        import wandb

        config = self.config if forked_from is None else {**self.config,
                                                          "forked_from": forked_from}
        self.run = wandb.init(project=self.cfg.project, entity=self.cfg.entity,
                              group=self.cfg.group, name=self.name, id=run_id, resume="allow",
                              mode=self.mode, dir=str(self.run_dir), config=config)
        log.info("wandb: %s run %s (%s)", self.mode, self.run.id, self.run.dir)

    def _held_by_wandb(self) -> int:
        """The highest step W&B already holds for this run: in the transaction logs of earlier
        attempts here, and (online) on the server, which resumes the run after its last step."""
        folder = Path(self.run.dir).parent
        local = wandb_log.last_step(folder.parent, self.run.id, skip=folder)
        server = self.run.starting_step - 1 if self.mode == "online" else 0
        return max(local, server, 0)

    def go_back(self, step: int, surviving: list[dict[str, Any]]) -> None:
        """The run goes on from ``step`` (a resume or a rollback), its rows so far ``surviving``:
        drop the held rows (after ``step``: abandoned), fork when W&B already holds steps past
        ``step``, and send the surviving rows W&B lacks."""
        if self.through > step:
            old = self.run.id
            log.warning("wandb: run %s already holds steps up to %d, past step %d where this "
                        "run goes on: continuing in a new W&B run forked from it at step %d "
                        "(its rows up to there replayed)", old, self.through, step, step)
            self.run.finish()
            self._init(None, forked_from=f"{old}?_step={step}")
            self.through = 0
        self.skip_through = self.through
        self.held = [row for row in surviving if row["step"] <= step]
        self.commit()

    def log(self, row: dict[str, Any]) -> None:
        self.held.append(row)

    def commit(self) -> None:
        """Send the held rows: a checkpoint now covers them (or the run is complete)."""
        for row in self.held:
            if row["step"] > self.skip_through:  # W&B's own copy of an earlier step stays
                self.run.log({k: v for k, v in row.items() if k != "step" and v is not None},
                             step=row["step"])
                self.through = max(self.through, row["step"])
        self.held = []

    def log_samples_table(self, rows: list[dict[str, Any]], key: str = "samples",
                          step: int | None = None) -> None:
        """Generated samples (e.g. ``{"step", "prompt", "text"}`` each) as a W&B table, attached
        to the run's latest step: it adds no step of its own to the history. With ``step`` (an
        eval's), it is held with that step's rows and sent with them (or dropped with them)."""
        if step is not None:
            self.held.append({"step": step, key: samples_table(rows)})
            return
        self.run.log({key: samples_table(rows)}, commit=False)

    def log_model(self, folder: Path, aliases: list[str], metadata: dict[str, Any]) -> str:
        """A Hugging Face model folder as the run's ``model-<run id>`` artifact (type ``model``;
        a later call adds a version). The files are copied to W&B's staging area at once, so
        ``folder`` may go when this returns; offline, ``wandb sync`` uploads them. Returns the
        artifact's name."""
        import wandb

        artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata=metadata)
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact, aliases=aliases)
        log.info("wandb: logged %s as artifact %s (%s)", folder, artifact.name, ", ".join(aliases))
        return artifact.name

    def close(self) -> None:
        if self.held:
            log.info("wandb: %d rows after the last checkpoint were not sent (a resume repeats "
                     "their steps)", len(self.held))
        self.run.finish()
        if self.mode == "offline":
            log.info("wandb: offline run saved; upload it with `wandb sync %s`",
                     Path(self.run.dir).parent)
