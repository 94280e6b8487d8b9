"""A Predictor's network as serialized StableHLO (jax.export), one function per canvas, plus its weights, inference
spec and label map.

The network (weights, canvases [B, Hc, Wc, 3] float32, window sizes [B, 2] int32 -> MaskRCNN.predict's fixed-size
outputs) is exported once per canvas (Hc, Wc), with the weights as its first argument, stored once beside the
functions. Resizing, mask pasting and the label map stay on the host, in serving.host.
`exported_model.ExportedModel` loads the directory and runs each image on its canvas.

Which canvases: with data.eval_canvas "fixed", the one canvas. With "padded", every pair of data.eval_canvas_sides
when that list is set (the canvases its images can get, up to the largest side), else the `canvases` given; a
shape-polymorphic export does not lower (the anchors and top-k sizes are static per canvas).
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from maskrcnn_jax.serving.exported_model import SPEC_FILE, WEIGHTS_FILE, exported_canvases, model_file
from maskrcnn_jax.serving.predictor import Predictor


def default_canvases(predictor: Predictor) -> list[tuple[int, int]]:
    """The canvases an export covers when none are given (see the module doc)."""
    spec = predictor.spec
    if spec.eval_canvas == "fixed":
        return [tuple(spec.canvas_size)]
    if spec.eval_canvas_sides:
        return [(h, w) for h in spec.eval_canvas_sides for w in spec.eval_canvas_sides]
    raise ValueError("with data.eval_canvas='padded' and no data.eval_canvas_sides, name the canvases to export "
                     "(--canvases=800x1216,1216x800), or set data.eval_canvas_sides to export every pair of them")


def export_predictor(predictor: Predictor, out_dir: str, platforms: Sequence[str] | None = None,
                     canvases: Sequence[Sequence[int]] | None = None) -> str:
    """Writes OUT/model_<H>x<W>.stablehlo per canvas, OUT/weights.npz and OUT/inference.json; returns OUT.
    `platforms` defaults to this machine's, `canvases` to default_canvases(predictor)."""
    spec = predictor.spec
    canvases = sorted({(int(h), int(w)) for h, w in (canvases or default_canvases(predictor))})
    divisor = spec.size_divisibility if spec.eval_canvas == "padded" else 1
    for canvas in canvases:
        if canvas[0] % divisor or canvas[1] % divisor:
            raise ValueError(f"canvas {canvas} is not a multiple of size_divisibility {divisor}")
    leaves, treedef = jax.tree.flatten(predictor.variables)
    network = jax.jit(lambda weights, images, sizes: predictor.network(jax.tree.unflatten(treedef, weights),
                                                                       images, sizes))
    weights = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
    os.makedirs(out_dir, exist_ok=True)
    for stale in exported_canvases(out_dir):  # an earlier export's functions would run with these weights
        os.remove(os.path.join(out_dir, model_file(stale)))
    for canvas in canvases:
        arguments = (weights, jax.ShapeDtypeStruct((spec.batch_size, *canvas, 3), jnp.float32),
                     jax.ShapeDtypeStruct((spec.batch_size, 2), jnp.int32))
        exported = jax.export.export(network, platforms=platforms)(*arguments)
        with open(os.path.join(out_dir, model_file(canvas)), "wb") as f:
            f.write(exported.serialize())
        logging.info("exported the %dx%d canvas for %s", *canvas, ", ".join(exported.platforms))
    np.savez(os.path.join(out_dir, WEIGHTS_FILE), *[np.asarray(leaf) for leaf in jax.device_get(leaves)])
    with open(os.path.join(out_dir, SPEC_FILE), "w") as f:
        f.write(spec.to_json())
    logging.info("exported %d canvases to %s", len(canvases), out_dir)
    return out_dir
