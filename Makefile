# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs, runs the tiny end-to-end pipeline on CPU
#   make test   creates .venv, installs, runs the tests
# Both are idempotent: the venv is (re)installed only when a requirements file changes.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP     := $(VENV)/.dev-installed
PYTEST_ARGS ?=
WORKDIR ?= runs/demo

# glibc malloc on transparent huge pages (`scalign.hostenv`): without it every large XLA
# temporary is faulted in 4 KiB at a time, each step (tests/objectives ran 59 s vs 43 s here).
# The launcher and `python -m scalign.bench` set it themselves; glibc < 2.35 ignores it.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: demo test test-all test-fast lint build-file bench clean venv venv-dev

venv: $(RUNTIME_STAMP)
venv-dev: $(DEV_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUNTIME_STAMP): requirements.txt pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

demo: $(RUNTIME_STAMP)
	$(PY) experiments/launch.py --config=experiments/configs/demo.py --workdir=$(WORKDIR) --overwrite
	@echo "report: $(WORKDIR)/report.md  results: $(WORKDIR)/results.json"

test: $(DEV_STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -m "not heavy" $(PYTEST_ARGS)

test-all: $(DEV_STAMP)
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: $(DEV_STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow and not heavy" $(PYTEST_ARGS)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check src tests experiments tools
	cd tpu && ../$(VENV)/bin/shellcheck *.sh

build-file: $(RUNTIME_STAMP)
	$(PY) tools/update_build.py

bench: $(RUNTIME_STAMP)
	$(PY) -m scalign.bench sample --workload sample_llama_small
	$(PY) -m scalign.bench train --workload sft_llama_small
	$(PY) -m scalign.bench dpo --workload dpo_llama_small

clean:
	rm -rf runs .pytest_cache
