# Set-up and entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv, install torch (CPU wheel, pinned) and the project, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo demo-reference lint test test-fast clean-demo

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

# Maintainers: after `make clean-demo demo` under portable numerics on a clean tree, make the
# finished demo the committed reference (pipeline/demo_reference.json) that every demo
# compares itself with; it prints the README's demo table.
demo-reference:
	$(BIN)/python -m pipeline.demo_check --write

# Lint and format check (ruff, configured in pyproject.toml); `make test` runs it first.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two pytest workers, one test file each at a time (--dist loadfile): the documented examples
# run in order in one of them while the other takes the rest of the suite. Lint first.
test: install lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# CI only (root, Debian): install the real parts that the tests marked `slurm` and `browser`
# drive (Debian's Slurm and Chromium), then run the suite with a one-node Slurm cluster started
# for the run (tests/conftest.py) and stopped after it. `make test` does neither.
.PHONY: test-parts test-ci
test-parts:
	bash scripts/install_test_parts.sh

test-ci: test-parts
	HNFM_SLURM_CLUSTER=start $(MAKE) test

# The working loop: unit tests only (end-to-end tests are marked `slow`); CI runs `make test`.
test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

clean-demo:
	rm -rf data/demo_cohort cache runs reports predictions embeddings/*.h5 embeddings/.shards
