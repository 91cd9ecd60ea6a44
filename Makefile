# odoledger: one entry point for the demo, the tests and the checks, locally and in CI.
#
#   make demo    system packages, the venv, then the simulated car and backend
#   make test    system packages, the venv, make check, then the whole pytest suite
#   make check   ruff and mypy --strict on every package
#   make bench   every benchmark in bench/
#
# `make deps` needs root for what is missing (it says so); everything else runs as any user.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.NOTPARALLEL:

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.odoledger-installed
PYTEST_ARGS ?=
ARTIFACTS := test-artifacts

.PHONY: help deps venv test check demo bench clean distclean

help:
	@sed -n '3,8p' Makefile | sed 's/^# \{0,1\}//'

deps:
	@scripts/deps.sh

venv: $(STAMP)

# Reinstalled only when pyproject.toml changes (or the venv is missing).
$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then echo "venv: creating $(VENV)"; $(PYTHON) -m venv $(VENV); fi
	$(BIN)/python -m pip install -q -e '.[agent,backend,dev]'
	@touch $@

# Every test runs: a missing mosquitto or PostgreSQL is a failure, never a skip. The log check
# keeps it that way should a skip for either ever creep in.
test: deps venv check
	@mkdir -p $(ARTIFACTS)
	$(BIN)/pytest $(PYTEST_ARGS) 2>&1 | tee $(ARTIFACTS)/pytest.log
	@if grep -Ei '^SKIPPED.*(mosquitto|postgres|psycopg|broker)' $(ARTIFACTS)/pytest.log; then \
		echo "test: tests that need mosquitto or PostgreSQL were skipped: that is a failure" >&2; exit 1; fi

check: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

demo: deps venv
	$(BIN)/python -m sim.demo

# Each bench/<name>.py (but __init__.py) runs as the module bench.<name>, from the repository
# root, so that it imports bench/, sim/ and the project as the tests do.
bench: deps venv
	@shopt -s nullglob; files=(bench/[!_]*.py); \
	if [ $${#files[@]} -eq 0 ]; then echo "bench: no benchmarks in bench/ yet"; fi; \
	for f in "$${files[@]}"; do m="bench.$$(basename "$$f" .py)"; echo "== python -m $$m"; \
		$(BIN)/python -m "$$m"; done

clean:
	rm -rf build dist $(ARTIFACTS) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
