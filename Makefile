# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv first (so does `make lint`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch comes first and separately: a cluster's own CUDA build is used when the system python has one.
TORCH ?= torch==2.13.0
# The venv's tools first: DeepSpeed rebuilds its CPU op whenever the ninja on PATH changes between runs.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the system torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q $(TORCH); \
	fi
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest tests

# unit tests only (seconds): data, configs, tokenisation
test-fast: setup
	$(PY) -m pytest tests -m "not slow"

# ruff (pinned in requirements.txt) with the rules in pyproject.toml; no format check (CLAUDE.md says why)
lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs/* logs/*.out
