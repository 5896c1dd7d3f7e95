"""``hydra/sweeper=optuna`` as Hydra finds it: Hydra accepts only sweeper classes defined in the
``hydra_plugins`` package, so the class is declared here; its code lives in
``megatrain.jobs.optuna_sweeper``. Hydra's plugin scan executes this file without registering
it as a module, which a dataclass with postponed annotations (the sweeper's config) cannot
survive: that stays in megatrain."""

from megatrain.jobs import optuna_sweeper as _impl


class OptunaSweeper(_impl.OptunaSweeper):
    """Optuna search over any config keys (``megatrain.jobs.optuna_sweeper``)."""
