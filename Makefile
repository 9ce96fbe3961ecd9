# `make test` and `make quickstart` each set up .venv on a fresh machine first.
# torch is pinned here (not in pyproject, which keeps a range) so that pip takes the CPU build on disk
# instead of downloading a multi-GB CUDA build; on a GPU machine, install the CUDA build you want first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast lint docs quickstart bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/torch-pin.txt
	$(BIN)/python -m pip install -q -c $(VENV)/torch-pin.txt -e '.[test]'
	touch $(STAMP)

# PYTEST_ARGS: extra pytest options (CI passes --durations)
test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the development lane: everything but the tests that start Ray, gloo process groups or the quickstart
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

# pages generated from the code (a test fails when they are stale)
docs: setup
	$(BIN)/python -m orchestrator.reference > docs/sweep-reference.md

# the quickstart sweep end to end: train (resumable; a re-run reuses the cache and finished runs), fit, figures
quickstart: setup
	@start=$$(date +%s) && \
	$(BIN)/sae-scaling run sweeps/quickstart.yaml && \
	$(BIN)/sae-scaling fit results/quickstart && \
	$(BIN)/sae-scaling figures results/quickstart && \
	echo "quickstart: $$(( $$(date +%s) - start )) s (setup not included)"

bench: setup
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache
