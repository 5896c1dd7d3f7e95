"""Hydra's own record of a run, kept in the run folder, and the rules that keep Hydra's folders and
``run.dir`` one and the same.

``<run.dir>/.hydra/`` holds what Hydra users expect: ``config.yaml`` (the composed config, as the
task function got it), ``overrides.yaml`` (the command-line overrides) and ``hydra.yaml`` (Hydra's
own config). ``<run.dir>/<job name>.log`` (``train.log``) gets megatrain's log lines. Both are
written by the process that trains as rank 0, once per start: Hydra's own writers are off
(``hydra.output_subdir: null``, ``hydra/job_logging: none``) because under torchrun every rank is
a Hydra app and the trainer configures the console itself.

A resumed run keeps its first record: the top of ``.hydra/`` is the start that reproduces the run
from scratch; every later start (resume, requeue) is recorded in ``.hydra/resume_<k>/``, and the
log file is appended to, each start opening with a ``---- start`` line.

Folders: ``run.dir`` wins. A single run's Hydra folder (``hydra.run.dir``) is ``${run.dir}``, and
``hydra.run.dir=X`` on the command line is read as ``run.dir=X``. A multirun's jobs train in
``hydra.sweep.dir/<subdir>``, which becomes each job's ``run.dir``; ``run.dir=X`` given with
``-m`` is read as ``hydra.sweep.dir=X``. Nothing else makes a folder, so none stays empty.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from megatrain.errors import ConfigError
from megatrain.jobs.sweep import override_key

RECORD_DIR = ".hydra"
OVERRIDES = "overrides.yaml"
RERUN_FLAG = "--rerun"
_SWEEP_SYNTAX = ("choice(", "range(", "interval(", "glob(", "tag(")
log = logging.getLogger("megatrain")


def is_rank0() -> bool:
    """The process that writes the record: torchrun's rank 0, an srun step's task 0, or alone."""
    from megatrain.distributed import detect_world

    return detect_world().rank == 0


def record_folder(run_dir: Path) -> Path:
    """``.hydra/`` for the first start of a run, ``.hydra/resume_<k>/`` for the k-th restart."""
    top = run_dir / RECORD_DIR
    if not (top / OVERRIDES).exists():
        return top
    k = 1
    while (top / f"resume_{k}" / OVERRIDES).exists():
        k += 1
    return top / f"resume_{k}"


def write_run_record(cfg: DictConfig) -> Path | None:
    """Write ``config.yaml``, ``overrides.yaml`` and ``hydra.yaml`` where this start belongs (rank 0
    only); the folder written, or None."""
    if not HydraConfig.initialized() or not is_rank0():
        return None
    hydra = HydraConfig.get()
    folder = record_folder(Path(cfg.run.dir))
    folder.mkdir(parents=True, exist_ok=True)
    files = {"config.yaml": OmegaConf.to_yaml(cfg),
             "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra})),
             OVERRIDES: OmegaConf.to_yaml(OmegaConf.create(list(hydra.overrides.task)))}
    for name, text in files.items():  # overrides.yaml last: its presence marks a whole record
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(folder / name)
    return folder


@contextmanager
def job_log(cfg: DictConfig) -> Iterator[Path | None]:
    """megatrain's log lines (rank 0) also into ``<run.dir>/<job name>.log``, appended to."""
    if not HydraConfig.initialized() or not is_rank0():
        yield None
        return
    path = Path(cfg.run.dir) / f"{HydraConfig.get().job.name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("megatrain")  # the trainer replaces the root's handlers
    logger.addHandler(handler)
    overrides = " ".join(HydraConfig.get().overrides.task)
    handler.stream.write(f"---- start {datetime.now().isoformat(timespec='seconds')} "
                         f"pid {os.getpid()}: {overrides}\n")
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()


def recorded_overrides(run_dir: Path) -> list[str]:
    """The overrides of a run's first start (``.hydra/overrides.yaml``)."""
    path = run_dir / RECORD_DIR / OVERRIDES
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; {RERUN_FLAG} needs a run folder with Hydra's "
                          "record (.hydra/)")
    overrides = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{path}: not a list of overrides")
    return overrides


def expand_rerun(args: list[str]) -> tuple[list[str], Path | None]:
    """``--rerun RUN_DIR more...`` → the run's recorded overrides (less its ``run.dir``), then
    ``more`` (later overrides win); also the source folder, which the rerun must not train in."""
    if RERUN_FLAG not in args:
        return args, None
    i = args.index(RERUN_FLAG)
    if i + 1 >= len(args):
        raise ConfigError(f"{RERUN_FLAG} needs a run folder: {RERUN_FLAG} RUN_DIR run.dir=NEW")
    source = Path(args[i + 1])
    recorded = [o for o in recorded_overrides(source) if override_key(o) != "run.dir"]
    return args[:i] + recorded + args[i + 2:], source.resolve()


def check_not_source(cfg: DictConfig, source: Path | None) -> None:
    """A rerun into the folder it came from would resume that run, not reproduce it."""
    if source is not None and Path(cfg.run.dir).resolve() == source:
        raise ConfigError(f"run.dir={cfg.run.dir}: {RERUN_FLAG} trains a new run; give it "
                          "another folder (run.dir=NEW)")


def is_multirun(args: list[str]) -> bool:
    return "-m" in args or "--multirun" in args or "hydra.mode=MULTIRUN" in args


def align_run_dirs(args: list[str]) -> list[str]:
    """One folder setting per run (module doc): ``hydra.run.dir=X`` → ``run.dir=X`` for a single
    run, ``run.dir=X`` → ``hydra.sweep.dir=X`` for a multirun; both given and different is a
    ConfigError."""
    multirun = is_multirun(args)
    ours, alias = ("hydra.sweep.dir", "run.dir") if multirun else ("run.dir", "hydra.run.dir")
    values = {override_key(a): a.split("=", 1)[1]
              for a in args if "=" in a and not a.startswith("-")}
    if alias not in values:
        return args
    value = values[alias]
    if multirun and ("," in value or value.startswith(_SWEEP_SYNTAX)):
        raise ConfigError(f"run.dir={value}: a sweep's jobs train in hydra.sweep.dir/<job>; "
                          "set hydra.sweep.dir instead")
    if ours in values and values[ours] != value:
        raise ConfigError(f"{alias}={value} and {ours}={values[ours]}: one folder setting "
                          f"({ours} wins, {alias} follows it); give one of them")
    out = [a for a in args if "=" not in a or override_key(a) not in (ours, alias)]
    return out + [f"{ours}={value}"]


def main(argv: list[str] | None = None) -> None:
    """``python -m megatrain.jobs.run_record RUN_DIR``: the run's overrides, one per line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m megatrain.jobs.run_record RUN_DIR")
    print("\n".join(recorded_overrides(Path(args[0]))))


if __name__ == "__main__":
    main()
