# Development tasks (docs/testing.md describes the test tiers). Run from the repository root.
PYTHON ?= python
OUT ?= runs/gpu-suite
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help test test-quick lint format gpu bench

help:
	@echo "make test        the full CPU suite (README's test command, what CI runs)"
	@echo "make test-quick  the quick tier: no slow compile/end-to-end tests, no GPU tests"
	@echo "make lint        ruff check + ruff format --check (CI runs both)"
	@echo "make format      sort imports and format with ruff"
	@echo "make gpu         scripts/gpu_suite.sh \$$(OUT) on a GPU machine (OUT=$(OUT))"
	@echo "make bench       metagpt-fast bench \$$(BENCH_ARGS), e.g. BENCH_ARGS=--quick"

test:
	$(PYTHON) -m pytest

test-quick:
	$(PYTHON) -m pytest -m "not slow and not gpu"

lint:
	ruff check . && ruff format --check .

format:
	ruff check --select I --fix . && ruff format .

gpu:
	bash scripts/gpu_suite.sh $(OUT)

bench:
	$(PYTHON) -m metagpt_fast.cli bench $(BENCH_ARGS)
