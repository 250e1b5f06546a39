# The two commands: `make run` and `make test`. Both set up .venv when it is missing or stale.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
# test processes (pytest-xdist), a test file each: training runs on one thread, so two cores take two files at a time
JOBS ?= 2
# make run's minutes on this machine, all of it: the models train in what the other work leaves, judged by a probe of
# the machine's speed; a slower machine trains fewer steps (README "How long a model trains"). TRAIN_MINUTES (unset):
# the models' training minutes together instead, or as well (the smaller wins)
RUN_MINUTES ?= 19.5
TRAIN_MINUTES ?=

.PHONY: setup run data test test-all bench clean-outputs

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

run: setup            ## the whole pipeline on the built-in dataset within RUN_MINUTES
	$(BIN)/tessera run --run-minutes $(RUN_MINUTES) $(if $(TRAIN_MINUTES),--train-minutes $(TRAIN_MINUTES)) $(ARGS)

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
