# Set-up and entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv, install torch (CPU wheel, pinned) and the project, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/run-study --demo

test: install
	$(BIN)/python -m pytest -q tests

# Unit tests only (no end-to-end training, study or subprocess runs: marker `slow`), for the working loop.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

clean-demo:
	rm -rf data/demo_cohort cache runs reports predictions embeddings/*.h5 embeddings/.shards
