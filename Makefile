# FedMQ: `make demo` runs a federated run; `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck suite brokers results clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a file on disk serves 2.13.0, a looser spec downloads GBs.
	$(BIN)/pip install --quiet torch==2.13.0
	# ExecuTorch, the phones' training runtime, without its declared dependencies: they
	# pull ~55 packages (coremltools, pandas, hydra, a source build of antlr4) that neither
	# its exporter nor its runtime imports; pyproject lists the two they do.
	$(BIN)/pip install --quiet --no-deps executorch==1.5.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedmq demo --out runs/demo

# The brokers, and the browser the dashboard tests drive.
brokers:
	./.ci/ensure-brokers
	./.ci/ensure-browser

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Every test on two workers (so two deployments at most side by side), each handed the
# next tests as it gets free; the end-to-end tests go first (tests/conftest.py). The
# slowest are listed at the end, to keep the suite within its 15 minutes.
suite: $(STAMP)
	$(BIN)/pytest -n 2 --maxschedchunk 1 --durations=20

test: $(STAMP) brokers lint typecheck suite

# Regenerates every committed study table, data file and plot (about an hour on two cores;
# the McMahan et al. rows take most of it). `make test` checks the quickest study's table.
results: $(STAMP)
	$(BIN)/python -m experiments.studies.strategies_noniid
	$(BIN)/python -m experiments.studies.fedbuff_async
	$(BIN)/python -m experiments.studies.trace_sync_async
	$(BIN)/python -m experiments.studies.mcmahan2017 --rows cnn-iid,2nn-iid,2nn-noniid

clean:
	rm -rf $(VENV) runs .mypy_cache .ruff_cache .pytest_cache
