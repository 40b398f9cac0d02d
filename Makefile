# flaxtrain: `make train` sets up everything and trains the default config; `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/fashion_cnn.py
# Test processes (pytest-xdist): one per core by default; each test file runs in one of them
# (module fixtures are built once), the longest files first (tests/conftest.py orders them).
# TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= auto
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
ARGS ?=
# Debian ships the original Fashion-MNIST files: used offline where there is no internet.
FASHION_MNIST_DEB := /usr/share/datasets/fashion-mnist

.PHONY: venv data train test test-fast test-newest lint format bench clean

venv: $(BIN)/.installed

# setuptools>=77 (PEP 639 licence): tests/test_packaging.py builds the wheel offline.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip 'setuptools>=77'
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Prepares the default dataset in TFDS's data dir: from a local copy when there is one
# (installing Debian's package if we can), else by TFDS's normal download.
data: venv
	@if [ ! -d $(FASHION_MNIST_DEB) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || true; fi
	$(BIN)/python -m flaxtrain.datasets fashion_mnist

train: data
	$(BIN)/flaxtrain --config=$(CONFIG) $(ARGS)

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) --durations=30

test-fast: venv
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "not slow"

# The newest stack TPU VM and GPU users install: Python 3.12 (found, or installed by
# scripts/python312.sh) with the newest jax (with libtpu, for the TPU topology tests of
# describe --topology), flax, optax, orbax and TFDS; all but the slow tests.
NEWEST ?= .venv-newest
test-newest:
	@test -x $(NEWEST)/bin/python || { py=$$(bash scripts/python312.sh) && "$$py" -m venv $(NEWEST); }
	$(NEWEST)/bin/pip install --quiet --upgrade pip 'setuptools>=77'
	$(NEWEST)/bin/pip install --quiet --upgrade -e '.[dev]' 'jax[tpu]' flax optax \
	  orbax-checkpoint tensorflow-datasets grain
	@$(NEWEST)/bin/python -c "import sys, jax, flax, optax, orbax.checkpoint as o, \
	  tensorflow_datasets as t; print('newest stack: Python', sys.version.split()[0], \
	  'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, \
	  'orbax', o.__version__, 'tfds', t.__version__)"
	$(NEWEST)/bin/python -m pytest -q $(PYTEST_PARALLEL) -m "not slow" --durations=30

lint: venv
	$(BIN)/ruff check flaxtrain tests configs scripts
	$(BIN)/ruff format --check flaxtrain tests configs scripts

format: venv
	$(BIN)/ruff format flaxtrain tests configs scripts
	$(BIN)/ruff check --fix flaxtrain tests configs scripts

# `make bench`: full CLI runs (2 epochs) against PyTorch eager and the Flax tutorial loop,
# then the loop's own cost on tiny models (the two tables of the README). With ARGS, one
# mode: --full (10 epochs), --overhead, --window (the 400-step diagnostic), --input.
bench: data
ifeq ($(strip $(ARGS)),)
	$(BIN)/python scripts/benchmark.py --config=$(CONFIG)
	$(BIN)/python scripts/benchmark.py --overhead
else
	$(BIN)/python scripts/benchmark.py --config=$(CONFIG) $(ARGS)
endif

clean:
	rm -rf $(VENV) $(NEWEST) runs .pytest_cache
