# defectflow: `make demo` runs the whole flow on the embedded procedural data; `make test` runs lint + the tests.
# Both create .venv when it is missing (or when requirements.lock / pyproject.toml changed since it was installed).
#
# The environment is locked. requirements.lock pins every package, with hashes, for CPython 3.11 on linux x86_64
# (runtime + dev extra, plus pip itself). The venv installs exactly that file with pip, no resolution, so two
# clones get the same stack and the lint gate (ruff) only changes when the lock does. pip is used for installing
# because the pip configuration of the project's machines points at local copies of torch/torchvision (CUDA
# build, ~3 GB); the hashes in the lock are PyPI's, which those files match.
# `make lock` re-resolves pyproject.toml into requirements.lock with uv; commit both files together.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
PIP    := $(BIN)/python -m pip

# `make lock` runs `uv pip compile` (resolves the whole stack in seconds, for a target Python/platform, with
# hashes; pip-tools would run pip's resolver, which backtracks for minutes on this stack). uv is pinned and
# installed from PyPI into a tool directory outside the repo; it is not part of the venv.
UV_VERSION := 0.13.9
UV_DIR     ?= $(HOME)/.cache/defectflow/uv-$(UV_VERSION)
UV         := $(UV_DIR)/bin/uv
# The lock targets the torch/torchvision builds that lie on the project's machines' disk (pip takes them from
# there); move these together with those files.
LOCK_PINS  := torch==2.14.1 torchvision==0.29.1
UV_COMPILE  = printf '%s\n' pip $(LOCK_PINS) | $(UV) pip compile --no-config pyproject.toml - --extra dev \
              --python-version 3.11 --python-platform x86_64-manylinux_2_28 --only-binary :all: \
              --generate-hashes --custom-compile-command 'make lock' --quiet --output-file $(LOCK)

.PHONY: demo test test-fast lint bench results install lock lock-upgrade clean

# install: create the venv and make it match requirements.lock exactly.
#   1. pip itself at the locked version;
#   2. every locked package, hash-checked, wheels only, --no-deps (the lock is complete: nothing to resolve);
#      pip byte-compiles them, which is half the install time but needed: these machines set
#      PYTHONDONTWRITEBYTECODE=1, so a venv without .pyc files recompiles its imports in every process;
#   3. defectflow itself, editable, no deps, built with the locked setuptools (no isolated build env);
#   4. remove packages that are no longer in the lock (when an existing venv is updated);
#   5. pip check: the locked set satisfies every package's requirements, pyproject.toml's included.
$(STAMP): $(LOCK) pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "requirements.lock is for Python 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "$$(grep -o '^pip==[^ ]*' $(LOCK))"
	$(PIP) install --progress-bar off --no-deps --require-hashes --only-binary :all: -r $(LOCK)
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	@extra=$$($(PIP) freeze --exclude-editable | sed 's/[=@ ].*//' | tr 'A-Z_.' 'a-z--' \
	         | grep -vxF -e "$$(sed -n 's/^\([a-z0-9][^=]*\)==.*/\1/p' $(LOCK) | tr '_.' '--')"); \
	  if [ -n "$$extra" ]; then echo "removing packages not in $(LOCK):" $$extra; $(PIP) uninstall --quiet -y $$extra; fi
	$(PIP) check
	@touch $(STAMP)

install: $(STAMP)

# lock: re-resolve after editing the dependencies in pyproject.toml; pins still allowed are kept (small diff).
lock: $(UV)
	$(UV_COMPILE)
	@echo "$(LOCK): $$(grep -c '^[a-z0-9].*==' $(LOCK)) packages pinned"

# lock-upgrade: re-resolve everything to the newest versions pyproject.toml allows.
lock-upgrade: $(UV)
	$(UV_COMPILE) --upgrade
	@echo "$(LOCK): $$(grep -c '^[a-z0-9].*==' $(LOCK)) packages pinned"

$(UV):
	$(PYTHON) -m pip install --quiet --target $(UV_DIR) uv==$(UV_VERSION)

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

# results: re-run the experiments behind the README's figures and rewrite workflows/results/<experiment>/ (raw
# output the tables are built from). `make results` runs all of them (hours on 2 CPU cores); `make results
# EXP="mt-ssn-seeds sd900"` some; SEEDS="0 1 2" sets the seeds of the seeded tables.
results: $(STAMP)
	workflows/results/reproduce.sh $(or $(EXP),all)

clean:
	rm -rf $(VENV) defectflow-demo .pytest_cache
