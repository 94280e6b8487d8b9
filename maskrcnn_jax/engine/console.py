"""What the console shows: this package's own messages (the progress line, the evaluation tables, where files went)
and every error. Library messages (TensorFlow, TFDS, Orbax, JAX, Python warnings) go to the run's log file,
WORKDIR/logs/log.txt, or to the console as well with verbose=True.

TensorFlow's C++ side writes to file descriptor 2 directly, some of it before any setting can silence it (the oneDNN
notice, grappler's cost-estimator dumps), so without verbose the descriptor itself is pointed at the log file, and
Python's own stderr (tracebacks, this package's log lines) keeps the terminal."""

from __future__ import annotations

import logging as std_logging
import os
import sys
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
    path = workdir_lib.log_file(workdir)
    if not verbose:
        terminal = os.fdopen(os.dup(2), "w", buffering=1)
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        sys.stderr = terminal
        logging.get_absl_handler().python_handler.stream = terminal
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
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
    logging.info("logging to %s%s", path, "" if verbose else " (library messages only there; --verbose shows them)")
    return path
