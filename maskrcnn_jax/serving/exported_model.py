"""Runs a model exported by `python -m maskrcnn_jax.export` with JAX and NumPy alone: no modeling code, no config.

    model = ExportedModel("exported_dir")
    result = model(image)      # the same dict as inference.Predictor: boxes, scores, labels, names, masks

An export directory holds model.stablehlo (jax.export's serialized StableHLO of the network, weights included) and
inference.json (canvas, resize, normalisation, mask threshold, batch size and label map). This file, serving/host.py
and data/image_resize.py are all a server needs.
"""

from __future__ import annotations

import os

import jax
import numpy as np

try:
    from maskrcnn_jax.serving import host
except ImportError:  # copied out of the package, next to host.py
    import host

MODEL_FILE = "model.stablehlo"
SPEC_FILE = "inference.json"


class ExportedModel(host.ImagePredictor):
    def __init__(self, directory: str):
        with open(os.path.join(directory, SPEC_FILE)) as f:
            self.spec = host.InferenceSpec.from_json(f.read())
        with open(os.path.join(directory, MODEL_FILE), "rb") as f:
            self.exported = jax.export.deserialize(bytearray(f.read()))
        self._call = jax.jit(self.exported.call)

    def run_batch(self, canvases: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        return jax.device_get(self._call(canvases, image_sizes))
