"""Package list for setuptools: everything under megatrain/, plus the top-level configs/ folder,
which ships as the package ``megatrain.configs`` so Hydra finds it in a wheel and in an editable
install alike (pyproject.toml maps the folder)."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["megatrain", "megatrain.*"]) + ["megatrain.configs"])
