"""The layout rules of docs/architecture.md, checked on the source: no import cycles, the library
never imports a command, one folder per model family."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from megatrain.models.registry import MODEL_SPECS

PACKAGE = Path(__file__).resolve().parents[2] / "megatrain"
# ``python -m megatrain.<name>`` entry points: they only hand over to megatrain.cli.
COMMAND_SHIMS = {"megatrain.train", "megatrain.prepare", "megatrain.generate", "megatrain.export",
                 "megatrain.plan", "megatrain.plot", "megatrain.eval.__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"


def _imported(module: str, path: Path) -> set[str]:
    """The megatrain modules ``module`` imports anywhere in its code (deferred imports count:
    they only hide a cycle), except under ``if TYPE_CHECKING``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                         for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in MODULES and m != module}


GRAPH = {module: _imported(module, path) for module, path in MODULES.items()}


def _cycles() -> Iterator[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []

    def strong(v: str) -> Iterator[list[str]]:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                yield from strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                yield sorted(component)

    for v in sorted(GRAPH):
        if v not in index:
            yield from strong(v)


def test_the_import_graph_is_read() -> None:
    assert "megatrain.models.registry" in GRAPH["megatrain.training.trainer"]
    assert "megatrain.data.tokenizer.base" in GRAPH["megatrain.data.tokenizer.hf_tokenizer"]
    assert len(GRAPH) > 80


def test_no_import_cycle_in_the_library() -> None:
    assert list(_cycles()) == []


def test_a_cycle_would_be_found() -> None:
    GRAPH["megatrain.models.spec"].add("megatrain.models.registry")
    try:
        assert any("megatrain.models.registry" in c for c in _cycles())
    finally:
        GRAPH["megatrain.models.spec"].discard("megatrain.models.registry")


def test_the_library_never_imports_a_command() -> None:
    library = {m for m in GRAPH if not m.startswith("megatrain.cli") and m not in COMMAND_SHIMS}
    offenders = {m: sorted(i for i in GRAPH[m] if i.startswith("megatrain.cli")
                           or i in COMMAND_SHIMS) for m in library}
    assert {m: i for m, i in offenders.items() if i} == {}


@pytest.mark.parametrize("family", sorted(MODEL_SPECS))
def test_a_family_is_one_folder(family: str) -> None:
    """Its model, spec and Hugging Face adapter live in ``models/<folder>/`` and nowhere else."""
    spec = MODEL_SPECS[family]
    homes = {spec.build.__module__, spec.config_cls.__module__, spec.flops_per_token.__module__,
             spec.hf.config_to_hf.__module__, spec.hf.config_from_hf.__module__}
    folders = {m.rsplit(".", 1)[0] for m in homes}
    assert len(folders) == 1, homes
    folder = PACKAGE.parent / Path(*folders.pop().split("."))
    assert {"model.py", "spec.py", "hf.py"} <= {p.name for p in folder.iterdir()}
