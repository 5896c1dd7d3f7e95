"""Package list for setuptools: everything under megatrain/, plus the top-level configs/ folder,
which ships as the package ``megatrain.configs`` so Hydra finds it in a wheel and in an editable
install alike (pyproject.toml maps the folder)."""

from setuptools import find_namespace_packages, find_packages, setup

# hydra_plugins/: megatrain's Hydra plugins (hydra/sweeper=optuna), in Hydra's namespace package.
setup(packages=find_packages(include=["megatrain", "megatrain.*"]) + ["megatrain.configs"]
      + find_namespace_packages(include=["hydra_plugins.*"], exclude=["*.__pycache__"]))
