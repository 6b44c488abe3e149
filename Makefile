# defectflow: `make demo` runs the whole flow on the embedded procedural data; `make test` runs the tests.
# Both create .venv and install the project (with its dev extra) when it is missing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench install clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "defectflow needs Python >= 3.11 (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/defectflow demo

lint: $(STAMP)
	$(BIN)/ruff check components workflows serve_apps tests

test: $(STAMP) lint
	$(BIN)/python -m pytest -q --timeout=900 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/defectflow bench gmbinet

clean:
	rm -rf $(VENV) defectflow-demo .pytest_cache
