# The two commands: `make run` and `make test`. Both set up .venv when it is missing or stale.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
# test processes (pytest-xdist), a test file each: training runs on one thread, so two cores take two files at a time
JOBS ?= 2
# make run's minutes for all the models' training (shared by table `minutes`): with data, evaluation and the round
# trips, 20 minutes on 2 cores; a slower machine trains fewer steps (README "How long a model trains")
TRAIN_MINUTES ?= 19

.PHONY: setup run data test test-all bench clean-outputs

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

run: setup            ## the whole pipeline on the built-in dataset, the models' training within TRAIN_MINUTES
	$(BIN)/tessera run --train-minutes $(TRAIN_MINUTES) $(ARGS)

data: setup           ## only the data flow
	$(BIN)/tessera data $(ARGS)

test: setup           ## fast tests (slow ones: make test-all); JOBS=1 for one process
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile $(ARGS)

test-all: setup
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile -m '' $(ARGS)

bench: setup
	$(BIN)/python -m benchmarks $(ARGS)

clean-outputs:
	rm -rf outputs
