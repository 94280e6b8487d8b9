PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two stamps: the demo needs only the runtime; the suite adds the test and parity extras (torch, torchvision).
RUNTIME_STAMP := $(VENV)/.installed-runtime
TEST_STAMP := $(VENV)/.installed-test

.PHONY: test clean demo

$(RUNTIME_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUNTIME_STAMP)

$(TEST_STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install --quiet -e '.[test,parity]'
	touch $(TEST_STAMP)

# The suite's budget is 15 minutes of pytest on 2 cores. Its tests are mostly single-threaded XLA compiles, so one
# pytest worker per core nearly halves it; whole files go to one worker, so module fixtures are built once. Each
# worker holds JAX, TensorFlow and torch (~4 GB).
TEST_WORKERS ?= 2

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# Generates the synthetic shapes, trains Mask R-CNN on the CPU, evaluates, writes overlay PNGs of validation
# predictions (workdir/shapes_demo/overlays) and prints box and mask AP.
demo: $(RUNTIME_STAMP)
	$(BIN)/python -m maskrcnn_jax.main --config=configs/shapes.py --workdir=workdir/shapes_demo

clean:
	rm -rf $(VENV)
