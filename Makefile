PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test clean demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,parity]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# Generates the synthetic shapes, trains Mask R-CNN on the CPU, evaluates, writes overlay PNGs of validation
# predictions (workdir/shapes_demo/overlays) and prints box and mask AP.
demo: $(STAMP)
	$(BIN)/python -m maskrcnn_jax.main --config=configs/shapes.py --workdir=workdir/shapes_demo

clean:
	rm -rf $(VENV)
