# Development tasks. Needs only python3 (>= 3.10) and make; everything else is
# installed into .venv on first use, and re-installed when pyproject.toml changes.

PYTHON ?= python3
EXTRA ?= dev
PYTEST_ARGS ?=

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRA)
# bench/ is linted too once it exists.
LINT_PATHS := src tests examples $(wildcard bench)

.DEFAULT_GOAL := test
.PHONY: venv demo serve test lint format bench soak docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRA)]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# the progress page of examples/progress on http://127.0.0.1:5000 (Ctrl+C stops it)
serve: $(STAMP)
	$(BIN)/python examples/progress/app.py

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy
	$(BIN)/mypy --strict tests/typing

format: $(STAMP)
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

# the benchmark's peers (Dask distributed) come with the `bench` extra, on top of EXTRA's
BENCH_STAMP := $(VENV)/.installed-bench-$(EXTRA)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[$(EXTRA),bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

# the fault suite at a larger scale (minutes; not in CI): prints the counts table
soak: $(STAMP)
	$(BIN)/python -m tests.soak

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage htmlcov
	rm -rf examples/instance docs/_build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	if [ -d examples ]; then find examples -name '*.log' -type f -delete; fi
