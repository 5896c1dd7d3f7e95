"""megatrain's Hydra sweeper ``hydra/sweeper=optuna``: Optuna search over any config keys
(``optuna_sweeper.py``). Hydra finds it by scanning the ``hydra_plugins`` namespace package."""
