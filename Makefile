# dvidetl — every target creates .venv and installs the project if needed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all setup run test bench lint fuzz faults vast-conformance strip-notebooks clean

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## make run: the demo export end to end on the embedded default (synthetic source → Parquet), then verify.
run: $(STAMP)
	$(BIN)/python -m dvidetl run --uuid demo --sink parquet://./dvidetl-out
	$(BIN)/python -m dvidetl verify --uuid demo --sink parquet://./dvidetl-out

## make test: the whole suite.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check dvidetl tests bench

fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz

faults: $(STAMP)
	$(BIN)/python -m pytest -q tests/faults

vast-conformance: $(STAMP)
	$(BIN)/python -m dvidetl.testing.conformance

## make strip-notebooks: clear outputs from notebooks/*.ipynb before committing (tests/test_notebooks.py checks).
strip-notebooks: $(STAMP)
	$(BIN)/python -c "import sys, nbformat; [nbformat.write(nb, p) for p in sys.argv[1:] for nb in [nbformat.read(p, as_version=4)] if [c.update(outputs=[], execution_count=None) for c in nb.cells if c.cell_type == 'code'] is not None]" notebooks/*.ipynb

clean:
	rm -rf $(VENV) dvidetl-out .pytest_cache
