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

.PHONY: install test test-all lint quickstart mini mini-table1 mini-table2 bench gpu-check wheels cluster-costs clean

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

# The GPU check (docs/cluster.md "Checking a GPU machine"): one CUDA GPU, at most 8 minutes; results in
# results/bench/*-cuda.{json,md}. Not tied to the venv: a GPU machine may be offline, with its own torch.
# There, the pure-Python dependencies it lacks come from .whl/ (make wheels, where PyPI is reachable).
gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then \
		python3 -m pip install -q --no-index --no-deps --upgrade --target .whl/site .whl/*.whl; fi
	PYTHONPATH=$(CURDIR):$(CURDIR)/.whl/site$${PYTHONPATH:+:$$PYTHONPATH} python3 scripts/gpu_check.py

# Wheels of the pure-Python dependencies a bare GPU image (torch, lightning, torchmetrics, rich already
# there) lacks, for `make gpu-check` on a machine without package access: copy .whl/ along.
OFFLINE_WHEELS := hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
	submitit==1.5.4 hydra-submitit-launcher==1.2.0 fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 \
	termcolor==3.3.0
wheels:
	$(PY) -m pip wheel -q --no-deps -w .whl $(OFFLINE_WHEELS)

# The cost table of docs/cluster.md, from the same code as the sweeper's projection (minutes: it
# composes every paper job).
cluster-costs: $(STAMP)
	$(BIN)/python scripts/cluster_costs.py

clean:
	rm -rf $(VENV) outputs multirun runs wandb .pytest_cache .ruff_cache
