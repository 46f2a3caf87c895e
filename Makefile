# One-command entry points. `make test` and `make quickstart` install into .venv first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The venv's entry points (convnn-train, ...) come first, as if it were activated (tests call them).
export PATH := $(CURDIR)/$(BIN):$(PATH)
# Where datasets live (<root>/cifar10, ...): the offline copy beside the checkout when there is one.
CONVNN_DATA_ROOT ?= $(if $(wildcard ../shared/data/cifar10),../shared/data,data)
export CONVNN_DATA_ROOT

.PHONY: install test test-all lint quickstart mini mini-table1 mini-table2 bench clean

# compat: the checkout on sys.path, so Hydra's scan of the hydra_plugins namespace finds our plugins
# (setuptools' default editable finder hides them from pkgutil).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP)
	$(BIN)/pytest -q

test-all: $(STAMP)
	$(BIN)/pytest -q -m ''

quickstart: $(STAMP)
	$(BIN)/convnn-train experiment=quickstart

# The mini reproduction (README "The mini reproduction"): 33 runs, then its records (copied without
# machine paths into results/reproduced/mini/records/) and the tables, figures and claims made from them.
# The two tables' sweeps run side by side, one torch thread each (they take about as long as each other).
mini: $(STAMP)
	$(MAKE) -j2 mini-table1 mini-table2
	$(BIN)/convnn-tables export=$${CONVNN_RUNS_DIR:-runs}/mini out=results/reproduced/mini/records
	$(BIN)/convnn-tables claims=mini source=results/reproduced/mini/records

mini-table1 mini-table2: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/convnn-train -m experiment=mini/$(@:mini-%=%)

bench: $(STAMP)
	$(BIN)/python scripts/bench_layers.py

clean:
	rm -rf $(VENV) outputs multirun runs wandb .pytest_cache .ruff_cache
