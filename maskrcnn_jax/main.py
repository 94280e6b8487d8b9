"""Command line: train and evaluate (or only evaluate) a config.

    python -m maskrcnn_jax.main --config=configs/shapes.py --workdir=/tmp/shapes_run \
        [--config.train.num_steps=2000 --config.train.eval_only=True ...]

Flags are only the config file (with `--config.a.b=value` overrides; an unknown key is an error) and the
workdir. In a cluster (SLURM, Open MPI, multi-host TPU, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID set explicitly) `jax.distributed.initialize()` runs first.
"""

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and evaluation results.")
config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py) defining get_config().",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def in_cluster(environ=os.environ) -> bool:
    """Whether this process is one of several that jax.distributed must connect."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(environ.get("SLURM_NTASKS", "1")) > 1 or int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    # Multi-host TPU slices list their workers; a single host lists one.
    return "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(environ=os.environ) -> None:
    import jax

    if not in_cluster(environ):
        return
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


class _DropLibraryChatter(std_logging.Filter):
    """Orbax logs every step of every save at INFO; keep its warnings and errors only."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_DropLibraryChatter())
    from maskrcnn_jax.data.devices import hide_accelerators_from_tensorflow

    hide_accelerators_from_tensorflow()
    initialize_distributed()
    from maskrcnn_jax import train

    metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if metrics:
        print(f"box AP {metrics['bbox_AP']:.4f}  mask AP {metrics['segm_AP']:.4f}  "
              f"(COCO AP@[.5:.95]; all metrics in {os.path.join(FLAGS.workdir, 'eval_metrics.jsonl')})",
              flush=True)


if __name__ == "__main__":
    app.run(main)
