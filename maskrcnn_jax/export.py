r"""Command line: export a workdir's model as serialized StableHLO (jax.export) plus its inference spec and label map.

    python -m maskrcnn_jax.export --workdir=workdir/shapes_demo --out=exported [--batch_size=1] \
        [--platforms=cpu,cuda] [--canvases=800x1216,1216x800]

One function per canvas: the fixed canvas, or with data.eval_canvas "padded" every pair of data.eval_canvas_sides,
or the --canvases given (which replace both). The weights are stored once, beside them.
`maskrcnn_jax.serving.exported_model.ExportedModel("exported")` runs the directory (see serving/export.py).
"""

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training or import workdir (its best, else latest, checkpoint is exported).")
flags.DEFINE_string("out", None, "Directory to write model_<H>x<W>.stablehlo, weights.npz and inference.json into.")
flags.DEFINE_integer("batch_size", 1, "Images per call of the exported network.")
flags.DEFINE_list("platforms", None, "Platforms to lower for (cpu, cuda, tpu); default: this machine's.")
flags.DEFINE_list("canvases", None, "Canvases to export, HEIGHTxWIDTH each; default: the config's (see above).")
flags.mark_flags_as_required(["workdir", "out"])


def parse_canvas(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise app.UsageError(f"--canvases takes HEIGHTxWIDTH entries, got {text!r}") from None
    return height, width


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from maskrcnn_jax.serving.export import export_predictor
    from maskrcnn_jax.serving.predictor import Predictor

    canvases = [parse_canvas(c) for c in FLAGS.canvases] if FLAGS.canvases else None
    predictor = Predictor.from_checkpoint(FLAGS.workdir, batch_size=FLAGS.batch_size)
    export_predictor(predictor, FLAGS.out, FLAGS.platforms, canvases)


if __name__ == "__main__":
    app.run(main)
