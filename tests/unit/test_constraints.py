"""constraints.txt, the versions CI installs, covers every dependency, fits pyproject's ranges,
and is what the README says is tested."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    torch = re.search(r"^TORCH \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    return {canonicalize_name(k): v for k, v in pins.items()} | {"torch": torch.group(1)}


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in [*project["dependencies"], *extras["dev"], *extras["hf"]]]


def test_every_dependency_is_pinned_within_its_range() -> None:
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in constraints.txt (make lock)"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])


def test_the_readme_lists_the_pinned_versions() -> None:
    readme = (REPO / "README.md").read_text()
    header, _, row = re.search(r"### Tested versions\n.*?\n(\|.*\|)\n(\|.*\|)\n(\|.*\|)\n",
                               readme, re.DOTALL).groups()
    names = [canonicalize_name(c.strip()) for c in header.strip("|").split("|")]
    versions = [c.strip() for c in row.strip("|").split("|")]
    pins = _pins()
    assert len(names) >= 8
    assert dict(zip(names, versions)) == {n: pins[n] for n in names}
