"""What the console shows: this package's own messages (the progress line, the evaluation tables, where files went)
and every error. Library messages (TensorFlow, TFDS, Orbax, JAX, Python warnings) go to the run's log file,
WORKDIR/logs/log.txt, or to the console as well with verbose=True."""

from __future__ import annotations

import logging as std_logging
import os
import warnings

from absl import logging

from maskrcnn_jax.engine import workdir as workdir_lib

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class OwnMessagesOnly(std_logging.Filter):
    """Passes records logged from this package's files, and anything at ERROR or above."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.ERROR or os.path.abspath(record.pathname).startswith(PACKAGE_DIR)


def setup(workdir: str, verbose: bool = False) -> str:
    """Routes logging as the module doc says; call before TensorFlow is imported. Returns the log file's path."""
    if not verbose:
        # TensorFlow's C++ side prints straight to stderr (deprecation notes, cost-estimator dumps); keep its errors.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    path = workdir_lib.log_file(workdir)
    to_file = std_logging.FileHandler(path)
    to_file.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] "
                                               "%(message)s"))
    root = std_logging.getLogger()
    root.addHandler(to_file)
    std_logging.captureWarnings(True)
    warnings.simplefilter("default")
    logging.set_verbosity(logging.INFO)
    if not verbose:
        logging.get_absl_handler().addFilter(OwnMessagesOnly())
    logging.info("logging to %s%s", path, "" if verbose else " (library messages only there; --verbose shows them)")
    return path
