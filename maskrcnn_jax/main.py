"""Command line: train and evaluate (or only evaluate) a config.

    python -m maskrcnn_jax.main --config=configs/shapes.py --workdir=/tmp/shapes_run \
        [--config.train.num_steps=2000 --config.train.eval_only=True ...] [--distributed=auto] [--verbose]

Flags are only the config file (with `--config.a.b=value` overrides; an unknown key is an error), the workdir,
whether to start `jax.distributed` (auto: when a cluster is detected, see engine.parallel.in_cluster), and whether
library warnings reach the console (they always go to the log file in WORKDIR/logs).

A workdir that another run holds (WORKDIR/train.lock), whose checkpoints do not restore, or whose disk refuses a
save ends the command with that error in one line, on the console and in the log file, and exit status 1.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and evaluation results.")
config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py) defining get_config().",
                                lock_config=True)
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Start jax.distributed: when a cluster is detected (auto), always (on) or never (off).")
flags.DEFINE_bool("verbose", False, "Show library warnings (TensorFlow, Orbax, absl) on the console too.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from maskrcnn_jax.engine import console

    console.setup(FLAGS.workdir, verbose=FLAGS.verbose)
    from maskrcnn_jax.data.devices import hide_accelerators_from_tensorflow
    from maskrcnn_jax.engine import parallel

    hide_accelerators_from_tensorflow()
    parallel.initialize_distributed(FLAGS.distributed)
    from absl import logging

    from maskrcnn_jax.engine import compilation_cache

    cache = compilation_cache.enable(FLAGS.config.compilation_cache_dir)  # before anything compiles
    logging.info("persistent compilation cache: %s", cache or "off")

    from maskrcnn_jax import train
    from maskrcnn_jax.engine import checkpointing, workdir as workdir_lib
    from maskrcnn_jax.evaluation import coco

    try:
        metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (workdir_lib.WorkdirLockedError, checkpointing.CheckpointRestoreError,
            checkpointing.CheckpointSaveError) as error:
        logging.error("%s: %s", type(error).__name__, error)
        sys.exit(1)
    if metrics:
        print(f"{coco.headline(metrics)}  (COCO AP@[.5:.95]; all metrics "
              f"in {os.path.join(FLAGS.workdir, workdir_lib.METRICS_FILE)})", flush=True)


if __name__ == "__main__":
    app.run(main)
