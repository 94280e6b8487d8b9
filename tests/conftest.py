import os
import pathlib
import zlib

try:
    # Loading torch's triton after TensorFlow segfaults the process (TF 2.21 + torch 2.14.1's triton); the test
    # modules import TensorFlow at collection and the parity tests import torch later, so triton goes first.
    import triton  # noqa: F401
except ImportError:
    pass

import jax
import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's own name: fresh inputs per test, reproducible per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def pytest_sessionstart(session):
    """CI sets MASKRCNN_JAX_REQUIRE_PARITY=1 (.ci/run): there the torchvision parity tests must run, not skip."""
    if os.environ.get("MASKRCNN_JAX_REQUIRE_PARITY") == "1":
        try:
            import torch  # noqa: F401
            import torchvision  # noqa: F401
        except ImportError as error:
            raise pytest.UsageError(f"MASKRCNN_JAX_REQUIRE_PARITY=1 but the parity extra is missing ({error}): "
                                    "install it with pip install -e '.[test,parity]'") from error


def pytest_configure(config):
    # Compiles dominate the suite on a CPU; a persistent cache makes reruns in the same checkout cheap.
    cache_dir = pathlib.Path(__file__).resolve().parent.parent / ".venv" / "jax_cache"
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
