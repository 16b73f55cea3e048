# dvidetl — every target creates .venv and installs the project if needed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
FUZZ_ARGS ?=

.PHONY: all setup run test bench lint fuzz faults mutants vast-conformance strip-notebooks clean

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## make run: the demo export end to end on the embedded default (synthetic source → Parquet), then verify.
run: $(STAMP)
	$(BIN)/python -m dvidetl run --uuid demo --sink parquet://./dvidetl-out --overwrite
	$(BIN)/python -m dvidetl verify --uuid demo --sink parquet://./dvidetl-out

## make test: the whole suite (tests/faults included), then 200,000 fuzz inputs (~1 min).
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(BIN)/python -m tests.fuzz --inputs 200000

bench: $(STAMP)
	$(BIN)/python -m bench

## make lint: ruff over the code, tests and benchmarks; mypy over dvidetl/ ([tool.mypy] in
## pyproject.toml; its cache makes a rerun take seconds).
lint: $(STAMP)
	$(BIN)/ruff check dvidetl tests bench
	$(BIN)/mypy

## make fuzz: codec fuzzing, numba bounds-checked (FUZZ_ARGS="--inputs 2000000 --seed 7").
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz $(FUZZ_ARGS)

## make faults: the fault-injection suite; prints the fault table at the end.
faults: $(STAMP)
	$(BIN)/python -m pytest -q tests/faults $(PYTEST_ARGS)

## make mutants: mutation testing (mutmut 3) of verify, cells, planning, transform and the sinks'
## exactly-once code ([tool.mutmut] in pyproject.toml), at low priority with one runner process;
## hours, not part of make test. Prints the killed/survived score per module at the end
## (MUTANTS_ARGS: mutant name globs, e.g. "dvidetl.tables.cells*", or a seeded sample of one
## module: MUTANTS_ARGS="$$(.venv/bin/python -m tests.mutation_sample 'dvidetl.tables.cells.*' 150)";
## survivors judged equivalent are listed with the reason in tests/mutants_equivalent.txt).
MUTANTS_ARGS ?=
mutants: $(STAMP)
	ln -sfn "$(abspath ..)/shared" shared   # mutmut runs the tests in ./mutants: ../shared from there
	nice -n 19 $(BIN)/mutmut run --max-children 1 $(MUTANTS_ARGS) || true
	rm -f shared
	$(BIN)/python -m tests.mutation_score

vast-conformance: $(STAMP)
	$(BIN)/python -m dvidetl.testing.conformance

## make strip-notebooks: clear outputs from notebooks/*.ipynb before committing (tests/test_notebooks.py checks).
strip-notebooks: $(STAMP)
	$(BIN)/python -c "import sys, nbformat; [nbformat.write(nb, p) for p in sys.argv[1:] for nb in [nbformat.read(p, as_version=4)] if [c.update(outputs=[], execution_count=None) for c in nb.cells if c.cell_type == 'code'] is not None]" notebooks/*.ipynb

clean:
	rm -rf $(VENV) dvidetl-out .pytest_cache mutants
