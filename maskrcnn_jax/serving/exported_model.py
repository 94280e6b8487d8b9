"""Runs a model exported by `python -m maskrcnn_jax.export` with JAX and NumPy alone: no modeling code, no config.

    model = ExportedModel("exported_dir")
    result = model(image)      # the same dict as the Predictor: boxes, scores, labels, names, masks, keypoints

An export directory holds model_<H>x<W>.stablehlo per canvas (jax.export's serialized StableHLO of the network on
that canvas, taking the weights as its first argument), weights.npz (the weights, once) and inference.json (canvas
rule, resize, normalisation, mask threshold, batch size, label map and keypoint names). This file, serving/host.py,
serving/keypoints.py, data/image_resize.py and layers/compile_options.py are all a server needs.

Each image runs on the canvas the spec gives it (host.InferenceSpec.canvas_for), so the results equal the
Predictor's. An image whose canvas was not exported runs on the smallest exported canvas that holds it (a warning
says so once per canvas): more padding than the Predictor uses, so its detections may differ slightly; export that
canvas (or use data.eval_canvas_sides) to avoid it.
"""

from __future__ import annotations

import os
import re
import warnings

import jax
import numpy as np

try:
    from maskrcnn_jax.layers.compile_options import compiler_options
    from maskrcnn_jax.serving import host
except ImportError:  # copied out of the package, next to host.py and compile_options.py
    import host
    from compile_options import compiler_options

SPEC_FILE = "inference.json"
WEIGHTS_FILE = "weights.npz"
_MODEL_FILE = re.compile(r"model_(\d+)x(\d+)\.stablehlo")


def model_file(canvas) -> str:
    """The file name of the function exported for `canvas` (height, width)."""
    return f"model_{int(canvas[0])}x{int(canvas[1])}.stablehlo"


def exported_canvases(directory: str) -> list[tuple[int, int]]:
    """The canvases (height, width) exported into `directory`, smallest area first."""
    if not os.path.isdir(directory):
        return []
    found = [m for m in map(_MODEL_FILE.fullmatch, os.listdir(directory)) if m]
    return sorted(((int(m.group(1)), int(m.group(2))) for m in found), key=lambda c: (c[0] * c[1], c))


class ExportedModel(host.ImagePredictor):
    def __init__(self, directory: str):
        self.directory = directory
        with open(os.path.join(directory, SPEC_FILE)) as f:
            self.spec = host.InferenceSpec.from_json(f.read())
        self.canvases = exported_canvases(directory)
        if not self.canvases:
            raise FileNotFoundError(f"no exported network (model_<H>x<W>.stablehlo) in {directory}")
        with np.load(os.path.join(directory, WEIGHTS_FILE), allow_pickle=False) as weights:  # arrays only
            self.weights = [jax.device_put(weights[f"arr_{i}"]) for i in range(len(weights.files))]
        self._calls = {}  # canvas -> jitted call of its exported function, deserialized on first use
        self._substituted = set()

    def canvas_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The spec's canvas if it was exported, else the smallest exported canvas that holds the image."""
        canvas = self.spec.canvas_for(image_size)
        if canvas in self.canvases:
            return canvas
        holding = [c for c in self.canvases if c[0] >= canvas[0] and c[1] >= canvas[1]]
        if not holding:
            raise ValueError(f"an image resized to {tuple(image_size)} needs a {canvas} canvas, and no exported "
                             f"canvas holds it (exported: {self.canvases})")
        if canvas not in self._substituted:
            self._substituted.add(canvas)
            warnings.warn(f"canvas {canvas} was not exported: running on {holding[0]}, with more padding than the "
                          "Predictor uses")
        return holding[0]

    def run_batch(self, canvases: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        canvas = tuple(int(v) for v in canvases.shape[1:3])
        if canvas not in self._calls:
            with open(os.path.join(self.directory, model_file(canvas)), "rb") as f:
                self._calls[canvas] = jax.jit(jax.export.deserialize(bytearray(f.read())).call,
                                                compiler_options=compiler_options())
        return jax.device_get(self._calls[canvas](self.weights, canvases, image_sizes))
