# llmfleet: `make dev` runs the whole stack locally, `make test` runs every check.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ENGINE ?= sim
PORT   ?= 8080

.PHONY: dev test lint unit bench bench-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/llmfleet dev --engine $(ENGINE) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff format --check common gateway worker tests bench
	$(BIN)/ruff check common gateway worker tests bench
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit -q

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -e . 'litellm[proxy]' matplotlib
	touch $(BENCH_VENV)/.installed

# Side-by-side benchmarks (direct, llmfleet, LiteLLM); writes docs/benchmarks-results.md.
# Install wrk (apt-get install wrk) for the raw req/s numbers; without it httpx is used.
bench: $(BENCH_VENV)/.installed
	LITELLM_LOCAL_MODEL_COST_MAP=True $(BENCH_VENV)/bin/python -m bench.run

bench-smoke: $(STAMP)
	$(BIN)/python -m bench.run --smoke --no-litellm

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache
