# llmfleet: `make dev` runs the whole stack locally, `make test` runs every check.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ENGINE ?= sim
PORT   ?= 8080

.PHONY: dev test lint unit e2e clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/llmfleet dev --engine $(ENGINE) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff format --check common gateway worker tests
	$(BIN)/ruff check common gateway worker tests
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit -q

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
