"""``hydra/sweeper=optuna``: a Hydra sweeper on current Optuna that searches any config keys for the
best final metric of a run (``eval_loss`` by default; minimised or maximised as the metric's own
direction, unless ``hydra.sweeper.direction`` says).

    megatrain-train -m hydra/sweeper=optuna hydra.sweeper.n_trials=20 experiment=quickstart \
        'optim.lr=tag(log, interval(1e-4, 1e-2))' 'trainer.micro_batch_size=choice(8, 16)'

Search spaces use the syntax of Hydra's own Optuna plugin: ``interval(a, b)`` (floats: Hydra
parses interval ends as floats), ``tag(log, interval(a, b))``, ``range(a, b[, step])`` (ints when
all are; b excluded, as in Hydra), ``choice(...)`` or ``a,b,c``; plain values are fixed for every
trial.
They come from the command line or ``hydra.sweeper.params``.

Trials run through whatever launcher is configured (the basic one: one after another in this
process; ``hydra/launcher=slurm``: each trial a SLURM job starting its own torchrun, requeued on
preemption), ``n_jobs`` at a time. Trial N is job N: it trains in ``<sweep dir>/N``. The study is
kept in ``<sweep dir>/optuna.journal`` (Optuna's journal file: no database, safe on a shared file
system), so the same command after an interrupted sweep goes on where it stopped: trials that
were running are launched again (and resume from their folders), finished ones are kept.
Why not hydra-optuna-sweeper: see docs/launching.md ("Search sweeps").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("megatrain")
JOURNAL = "optuna.journal"


@dataclass
class OptunaSweeperConf:
    """``hydra.sweeper.*`` keys of ``hydra/sweeper=optuna``."""

    _target_: str = "hydra_plugins.megatrain_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    metric: str = "eval_loss"  # a key of the run's final eval metrics (its summary)
    # minimize | maximize; None: the metric's own (losses minimised, accuracies maximised)
    direction: Optional[str] = None  # noqa: UP045 (OmegaConf reads it at run time)
    n_trials: int = 20
    n_jobs: int = 1  # trials launched together (SLURM: jobs in the queue at once)
    study_name: str = "${run.name}"
    # None: <sweep dir>/optuna.journal; "memory": not kept; else an Optuna storage URL.
    storage: Optional[str] = None  # noqa: UP045 (OmegaConf reads it at run time)
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler",
                                                  "seed": 0})
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf,
                             provider="megatrain")


def distribution(override: Override) -> Any:
    """The Optuna distribution of one sweep override (``override`` must be a sweep)."""
    import optuna.distributions as d

    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return d.CategoricalDistribution(list(override.sweep_iterator(Transformer.encode)))
    if isinstance(value, RangeSweep):
        step = value.step if value.step is not None else 1
        if any(isinstance(x, float) for x in (value.start, value.stop, step)):
            return d.FloatDistribution(value.start, value.stop - step, step=step)
        return d.IntDistribution(int(value.start), int(value.stop) - int(step), step=int(step))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return d.IntDistribution(value.start, value.end, log=log_scale)
        return d.FloatDistribution(value.start, value.end, log=log_scale)
    assert not isinstance(value, ChoiceSweep)
    raise ValueError(f"{override.input_line}: not a search space the Optuna sweeper knows")


def search_space(overrides: Sequence[Override]) -> tuple[dict[str, Any], list[str]]:
    """The swept keys' distributions, and the fixed overrides every trial gets."""
    space, fixed = {}, []
    for override in overrides:
        if override.is_sweep_override():
            if override.is_hydra_override():
                raise ValueError(f"{override.input_line}: Hydra's own keys cannot be searched")
            space[override.get_key_element()] = distribution(override)
        else:
            fixed.append(override.input_line)
    return space, fixed


def trial_overrides(fixed: list[str], params: dict[str, Any]) -> list[str]:
    return fixed + [f"{key}={value}" for key, value in params.items()]


class OptunaSweeper(Sweeper):
    """Ask Optuna for ``n_jobs`` trials, launch them, tell it their final metric; repeat."""

    def __init__(self, metric: str, direction: str | None, n_trials: int, n_jobs: int,
                 study_name: str, storage: str | None, sampler: Any,
                 params: DictConfig | None) -> None:
        from megatrain.jobs.sweep import direction_of

        if direction not in (None, "minimize", "maximize"):
            raise ValueError(f"hydra.sweeper.direction={direction}: minimize or maximize")
        self.metric, self.direction = metric, direction_of(metric, direction)
        self.n_trials, self.n_jobs = n_trials, max(1, n_jobs)
        self.study_name, self.storage = study_name, storage
        self.sampler = sampler  # Hydra has instantiated its _target_ already
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def _study(self, sweep_dir: Path) -> Any:
        import optuna

        storage: Any = self.storage
        if storage is None:
            from optuna.storages.journal import JournalFileBackend

            storage = optuna.storages.JournalStorage(JournalFileBackend(str(sweep_dir / JOURNAL)))
        elif storage == "memory":
            storage = None
        return optuna.create_study(
            study_name=self.study_name, storage=storage, direction=self.direction,
            sampler=self.sampler,
            load_if_exists=True)

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        lines = [f"{key}={value}" for key, value in self.params.items()] + list(arguments)
        space, fixed = search_space(parser.parse_overrides(lines))
        if not space:
            raise ValueError("hydra/sweeper=optuna: nothing to search; give a key a search "
                             "space, e.g. 'optim.lr=tag(log, interval(1e-4, 1e-2))'")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study = self._study(sweep_dir)
        returns = []
        for batch in self._batches(study, space):
            overrides = [trial_overrides(fixed, trial.params) for trial in batch]
            self.validate_batch_is_legal(overrides)
            results = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
            for trial, result in zip(batch, results):
                self._tell(study, trial.number, result)
            returns.append(results)
        self._log_best(study)
        return returns

    def _batches(self, study: Any, space: dict[str, Any]) -> Any:
        """Trials to run, ``n_jobs`` at a time: first those an interrupted sweep left running
        (same numbers, same params: they resume from their folders), then new ones."""
        from optuna.trial import TrialState

        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for i in range(0, len(stale), self.n_jobs):
            yield [_Resumed(t.number, t.params) for t in stale[i:i + self.n_jobs]]
        while True:
            left = self.n_trials - len(study.get_trials(deepcopy=False))
            if left <= 0:
                return
            yield [study.ask(space) for _ in range(min(self.n_jobs, left))]

    def _tell(self, study: Any, number: int, result: JobReturn) -> None:
        from optuna.trial import TrialState

        from megatrain.jobs.sweep import job_metric

        value = result.return_value if result.status == JobStatus.COMPLETED else None
        score = job_metric(value, self.metric)
        if score is None:
            log.warning("trial %d: failed or no final %s", number, self.metric)
            study.tell(number, state=TrialState.FAIL)
        else:
            study.tell(number, score)
            log.info("trial %d: %s %.4f", number, self.metric, score)

    def _log_best(self, study: Any) -> None:
        try:
            best = study.best_trial
        except ValueError:
            log.warning("optuna: no trial finished")
            return
        log.info("optuna: best trial %d, %s %.4f, %s", best.number, self.metric, best.value,
                 " ".join(f"{k}={v}" for k, v in best.params.items()))


@dataclass
class _Resumed:
    """A trial an interrupted sweep left running, launched again under its number."""

    number: int
    params: dict[str, Any]


def register() -> None:
    """Make the sweeper known to Hydra also in an editable install, whose import hook Hydra's
    plugin scan (pkgutil) cannot list; in a regular install the scan finds it as well."""
    from hydra_plugins.megatrain_optuna_sweeper.optuna_sweeper import OptunaSweeper as Plugin

    Plugins.instance().register(Plugin)
