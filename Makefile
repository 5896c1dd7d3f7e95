# Two commands on a fresh machine: `make quickstart` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only when the venv has no torch yet, so a CUDA build you bring is kept. On a GPU
# machine use e.g. `make quickstart TORCH=torch`; the default is the CPU build this project's
# machines carry.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup quickstart test test-unit lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

quickstart: setup
	$(VENV)/bin/megatrain-train experiment=quickstart

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check megatrain tests tools

clean:
	rm -rf $(VENV) outputs .pytest_cache
