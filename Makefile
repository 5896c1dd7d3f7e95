# Two commands on a fresh machine: `make quickstart` and `make test`. Both set up .venv first,
# with the dependency versions the suite was last green with (constraints.txt): torch through
# pip (it finds the machine's own wheel), the rest through uv (the same versions in seconds
# instead of minutes; pip if uv cannot be had).
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only when the venv has no torch yet, so a CUDA build you bring is kept. On a GPU
# machine use e.g. `make quickstart TORCH=torch`; the default is the CPU build this project's
# machines carry.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
CONSTRAINTS := constraints.txt
# `make test-latest`: the suite against the newest release of every dependency (torch excepted:
# the one in that venv is kept), in a venv of its own; `make lock` then records its versions.
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
NOT_LOCKED := '^(torch|triton|nvidia-)|^\#|^megatrain'

.PHONY: setup quickstart test test-unit test-latest lock lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c $(CONSTRAINTS) uv && \
		$(VENV)/bin/uv pip install -q --python $(PY) -c $(CONSTRAINTS) -e ".[dev]" || \
		$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

quickstart: setup
	$(VENV)/bin/megatrain-train experiment=quickstart

test: setup
	tools/test_suite.sh $(PY) $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-latest:
	test -x $(LATEST_PY) || python3 -m venv $(LATEST_VENV)
	$(LATEST_PY) -c "import torch" 2>/dev/null || $(LATEST_PY) -m pip install -q "$(TORCH)"
	$(LATEST_PY) -c "import torch; print('torch==' + torch.__version__)" > $(LATEST_VENV)/keep.txt
	$(LATEST_PY) -m pip install -q -U --upgrade-strategy eager -c $(LATEST_VENV)/keep.txt \
		-e ".[dev]" uv  # uv too, so `make lock` pins the one setup uses
	$(LATEST_PY) -m pip list 2>/dev/null | grep -iE \
		'^(deepspeed|transformers|tokenizers|hydra-core|webdataset|sentencepiece|wandb) '
	tools/test_suite.sh $(LATEST_PY) $(PYTEST_ARGS)

lock:
	test -x $(LATEST_PY) || { echo "run make test-latest first" >&2; exit 2; }
	{ grep '^#' $(CONSTRAINTS); $(LATEST_PY) -m pip freeze --exclude-editable \
		| grep -viE $(NOT_LOCKED); } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	@echo "constraints.txt now holds $(LATEST_VENV)'s versions: update README's table, commit"

lint: setup
	$(VENV)/bin/ruff check megatrain tests tools

clean:
	rm -rf $(VENV) $(LATEST_VENV) outputs .pytest_cache
