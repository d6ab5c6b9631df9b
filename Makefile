# Set-up and everyday commands. On a fresh machine `make demo` and `make test` do everything
# (virtual environment, Python packages, Debian packages the tests and benchmarks use).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test lint guest system-deps bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

system-deps:
	./tools/install-system-deps

## The main job: boot the built-in guest, checkpoint it, restore it, live-migrate it, report.
demo: $(BIN)/.installed
	$(BIN)/vmipc demo

## The whole test suite (lint and type checks first).
test: $(BIN)/.installed system-deps
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools
	$(BIN)/mypy

## Rebuild the committed built-in guest and test guests from source.
guest:
	$(MAKE) -C guest
	$(MAKE) -C tests/guests

bench: $(BIN)/.installed system-deps
	$(BIN)/pip install -q -e '.[dev,bench]'
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
