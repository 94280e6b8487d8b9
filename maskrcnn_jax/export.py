r"""Command line: export a workdir's model as serialized StableHLO (jax.export) plus its inference spec and label map.

    python -m maskrcnn_jax.export --workdir=workdir/shapes_demo --out=exported [--batch_size=1] \
        [--platforms=cpu,cuda]

`maskrcnn_jax.serving.exported_model.ExportedModel("exported")` runs the directory (see serving/export.py).
"""

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training or import workdir (its best, else latest, checkpoint is exported).")
flags.DEFINE_string("out", None, "Directory to write model.stablehlo and inference.json into.")
flags.DEFINE_integer("batch_size", 1, "Images per call of the exported network.")
flags.DEFINE_list("platforms", None, "Platforms to lower for (cpu, cuda, tpu); default: this machine's.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from maskrcnn_jax.serving.export import export_predictor
    from maskrcnn_jax.serving.predictor import Predictor

    predictor = Predictor.from_checkpoint(FLAGS.workdir, batch_size=FLAGS.batch_size)
    export_predictor(predictor, FLAGS.out, FLAGS.platforms)


if __name__ == "__main__":
    app.run(main)
