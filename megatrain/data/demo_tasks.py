"""Small task datasets made from the Python standard library's own source (present on every
machine, like the ``stdlib`` pretraining corpus), for the fine-tuning quickstarts: nothing is
fetched at run time, and a model pretrained on ``stdlib`` has seen the code, not the tasks.

- ``stdlib-sft`` (``{"prompt", "completion"}``): a function's signature line -> the first line of
  its docstring ("write the summary of this function").
- ``stdlib-cls`` (``{"text", "label"}``): a function's code (its docstring removed) -> the
  package it belongs to, one of :data:`PACKAGES`; the majority class is the baseline to beat.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

DEMO_TASKS = {"stdlib-sft": "sft", "stdlib-cls": "cls"}  # name -> megatrain-prepare --format
PACKAGES = ("asyncio", "email", "tkinter", "unittest")
MAX_CODE_CHARS = 600  # the start of a long function says enough about its package


def _functions(path: Path) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in old modules
            tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _package_files(package: str) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"]) / package
    return sorted(p for p in root.rglob("*.py") if "test" not in p.relative_to(root).parts[:-1])


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {node.name}({ast.unparse(node.args)}):"


def sft_rows() -> Iterator[dict[str, str]]:
    """(signature, docstring summary) of every documented function of the stdlib packages."""
    for package in PACKAGES:
        for path in _package_files(package):
            for node in _functions(path):
                doc = ast.get_docstring(node)
                summary = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
                if summary:
                    yield {"prompt": _signature(node), "completion": summary}


def cls_rows() -> Iterator[dict[str, str]]:
    """(function code without its docstring, package) for every function of the packages."""
    for package in PACKAGES:
        for path in _package_files(package):
            for node in _functions(path):
                if ast.get_docstring(node) is not None:
                    node.body = node.body[1:] or [ast.Pass()]
                yield {"text": ast.unparse(node)[:MAX_CODE_CHARS], "label": package}


def write_demo_task(name: str, path: Path) -> Path:
    """Task ``name`` (a key of :data:`DEMO_TASKS`) as JSON lines at ``path``, written once (aside,
    then renamed: ranks may ask at the same time, and the rows are the same for all)."""
    if path.is_file():
        return path
    rows = sft_rows() if DEMO_TASKS[name] == "sft" else cls_rows()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
