r"""Export a workdir's model as serialized StableHLO (jax.export) plus its inference spec and label map.

    python -m maskrcnn_jax.export --workdir=workdir/shapes_demo --out=exported [--batch_size=1] \
        [--platforms=cpu,cuda]

The network (canvases [B, Hc, Wc, 3] float32, window sizes [B, 2] int32 -> MaskRCNN.predict's fixed-size outputs)
is exported with its weights as constants; resizing, mask pasting and the label map stay on the host, in
inference_io. `exported.ExportedModel` loads the directory.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from maskrcnn_jax.exported import MODEL_FILE, SPEC_FILE
from maskrcnn_jax.inference import Predictor


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


def define_flags():
    """Only when run as a program: main.py defines --workdir too, and tests import both."""
    flags.DEFINE_string("workdir", None, "Training or import workdir (its best, else latest, checkpoint is exported).")
    flags.DEFINE_string("out", None, "Directory to write model.stablehlo and inference.json into.")
    flags.DEFINE_integer("batch_size", 1, "Images per call of the exported network.")
    flags.DEFINE_list("platforms", None, "Platforms to lower for (cpu, cuda, tpu); default: this machine's.")
    flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    predictor = Predictor.from_checkpoint(flags.FLAGS.workdir, batch_size=flags.FLAGS.batch_size)
    export_predictor(predictor, flags.FLAGS.out, flags.FLAGS.platforms)


if __name__ == "__main__":
    define_flags()
    app.run(main)
