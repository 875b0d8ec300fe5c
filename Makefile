# fastdpo: `make help` lists the targets. A fresh machine needs two: `make demo` and `make test`; both create
# .venv first through `make setup` (so does `make lint`).
#   make setup PYTHON=python3.12        another interpreter for .venv (3.11 or newer)
#   make setup TORCH_INDEX=cpu          the CPU-only torch wheel (laptops, CPU machines: ~200 MB, not GBs of CUDA)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch comes first and separately: a cluster's own CUDA build is used when the system python has one.
TORCH ?= torch==2.13.0
# Where pip takes torch from: empty = PyPI (on Linux its wheel is the CUDA build), `cpu` = PyTorch's CPU-only
# index, or any index URL (e.g. https://download.pytorch.org/whl/cu128 for one CUDA version).
TORCH_INDEX ?=
TORCH_INDEX_URL := $(if $(filter cpu,$(TORCH_INDEX)),https://download.pytorch.org/whl/cpu,$(TORCH_INDEX))
# trl 1.16 and transformers 5.23 need 3.11; pyproject.toml's requires-python says the same.
MIN_PYTHON := 3.11
# The venv's tools first: DeepSpeed rebuilds its CPU op whenever the ninja on PATH changes between runs.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-fast lint clean distclean

help:  ## this list
	@echo "usage: make TARGET [PYTHON=python3.11] [TORCH_INDEX=cpu]"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  \1\t/' | expand -t 14
	@echo "knobs: PYTHON ($(PYTHON); $(MIN_PYTHON)+), TORCH ($(TORCH)), TORCH_INDEX (cpu, or an index URL)"

setup: $(VENV)/.installed  ## create .venv with torch and the pinned requirements (once; again when they change)

# The marker is written last: a .venv without it is what a failed or interrupted setup left, and is rebuilt.
$(VENV)/.installed: requirements.txt
	@$(check_python)
	@if [ -e $(VENV) ] && [ ! -e $@ ]; then echo "removing $(VENV): an earlier setup did not finish"; rm -rf $(VENV); fi
	@if [ -z "$(TORCH_INDEX_URL)" ] && $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the system torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && \
		$(VENV)/bin/pip install -q $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) $(TORCH); \
	fi
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

# Run first when .venv is (re)built: an older Python fails late, in pip's resolver, and leaves a .venv behind. Not on
# every make: a .venv built with PYTHON=python3.12 keeps working when python3 is older.
define check_python
v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || { \
	echo "make setup: no $(PYTHON) here; fastdpo needs Python $(MIN_PYTHON)+: install one (pyenv install 3.11, uv python install 3.11, conda create -n fastdpo python=3.11, or module load python/3.11 on a cluster), then make setup PYTHON=<it>" >&2; exit 1; }; \
echo "$$v" | awk -F. -v want=$(MIN_PYTHON) '{ split(want, w, "."); exit !($$1 > w[1] || ($$1 == w[1] && $$2 >= w[2])) }' || { \
	echo "make setup: $(PYTHON) is Python $$v; fastdpo needs $(MIN_PYTHON)+ (trl 1.16, transformers 5.23): install one (pyenv install 3.11, uv python install 3.11, conda create -n fastdpo python=3.11, or module load python/3.11 on a cluster), then make setup PYTHON=python3.11" >&2; exit 1; }
endef

demo: setup  ## SFT then DPO on the embedded tiny model, on CPU (a few minutes), with a before/after table
	$(PY) scripts/demo.py

test: setup  ## the whole suite, as CI runs it: unit, e2e, parity, distributed, slurm (CPU; ~30 min on 2 cores)
	$(PY) -m pytest tests

test-fast: setup  ## tests/unit without the slow ones (about a minute): data, configs, tokenisation, house rules
	$(PY) -m pytest tests/unit -m "not slow"

# ruff (pinned in requirements.txt) with the rules in pyproject.toml; no format check (CLAUDE.md says why)
lint: setup  ## ruff check, as CI runs it first
	$(VENV)/bin/ruff check .

clean:  ## remove what runs wrote in the checkout: outputs/* (trained models, checkpoints) and logs/ (job logs)
	rm -rf outputs/* logs/*.out logs/.fastdpo-*

distclean: clean  ## clean, and remove .venv and the tool caches (the next make setup starts over)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
