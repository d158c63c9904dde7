# Two commands a user needs: `make run` and `make test`. Everything else is a convenience.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
RUNSTAMP := $(VENV)/.installed

.PHONY: run test test-fast lint typecheck bench clean venv

$(RUNSTAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(RUNSTAMP) $@

venv: $(STAMP)

run: $(RUNSTAMP)
	$(BIN)/tq up --data-dir ./.tq-data

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow and not cluster"

bench: $(STAMP)
	$(BIN)/tq bench --json bench.json

clean:
	rm -rf $(VENV) .tq-data .pytest_cache .mypy_cache .ruff_cache
