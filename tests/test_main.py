"""The command line: cluster detection for jax.distributed, and flag errors before any work starts."""

import os
import pathlib
import subprocess
import sys

import pytest

from maskrcnn_jax.engine import parallel

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("environ, expected", [
    ({}, False),
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, True),
])
def test_cluster_detection(environ, expected):
    assert parallel.in_cluster(environ) is expected


def test_a_misspelt_override_fails_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "maskrcnn_jax.main", f"--config={ROOT / 'configs' / 'test.py'}",
         f"--workdir={tmp_path / 'run'}", "--config.train.num_stpes=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0
    assert "num_steps" in result.stderr  # the error suggests the right key
    assert not (tmp_path / "run").exists()
