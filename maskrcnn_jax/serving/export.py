"""A Predictor's network as serialized StableHLO (jax.export) plus its inference spec and label map.

The network (canvases [B, Hc, Wc, 3] float32, window sizes [B, 2] int32 -> MaskRCNN.predict's fixed-size outputs)
is exported with its weights as constants; resizing, mask pasting and the label map stay on the host, in
serving.host. `exported_model.ExportedModel` loads the directory.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
from absl import logging

from maskrcnn_jax.serving.exported_model import MODEL_FILE, SPEC_FILE
from maskrcnn_jax.serving.predictor import Predictor


def export_predictor(predictor: Predictor, out_dir: str, platforms: Sequence[str] | None = None) -> str:
    """Writes OUT/model.stablehlo and OUT/inference.json; returns OUT. `platforms` defaults to this machine's."""
    spec = predictor.spec
    network = jax.jit(lambda images, sizes: predictor.network(predictor.variables, images, sizes))
    arguments = (jax.ShapeDtypeStruct((spec.batch_size, *spec.canvas_size, 3), jnp.float32),
                 jax.ShapeDtypeStruct((spec.batch_size, 2), jnp.int32))
    exported = jax.export.export(network, platforms=platforms)(*arguments)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, MODEL_FILE), "wb") as f:
        f.write(exported.serialize())
    with open(os.path.join(out_dir, SPEC_FILE), "w") as f:
        f.write(spec.to_json())
    logging.info("exported for %s to %s", ", ".join(exported.platforms), out_dir)
    return out_dir
