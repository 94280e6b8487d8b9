"""Two processes on localhost (jax.distributed, one CPU device each, gloo collectives) train 2 steps through
`python -m maskrcnn_jax.main` and end with the same parameters as one process stepping on the same global
batches (process 0's shard rows first, then process 1's). Their final evaluation, split over the two processes,
gives the COCO metrics that one process gives for the same checkpoint."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from maskrcnn_jax import train
from maskrcnn_jax.engine import checkpointing, datasets, parallel, workdir as workdir_lib
from maskrcnn_jax.modeling.mask_rcnn import build_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_training import ROOT, batches, restored_state, subprocess_env, tiny_config  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    data_root = str(tmp_path / "data")
    config = tiny_config(data_root, batch_size=2, num_steps=2)
    datasets.prepare_dataset(config)
    workdir = tmp_path / "two_processes"
    port = free_port()
    command = [sys.executable, "-m", "maskrcnn_jax.main", f"--config={ROOT / 'configs' / 'test.py'}",
               f"--workdir={workdir}", f"--config.data.data_dir={data_root}/tfds",
               f"--config.data.shapes.dir={data_root}/shapes", "--config.data.shapes.num_train=8",
               "--config.data.shapes.num_val=2", "--config.data.canvas_size=(64,64)",
               "--config.train.batch_size=2", "--config.train.num_steps=2", "--config.train.final_eval=True",
               "--config.eval.batch_size=2", "--distributed=on"]
    processes = []
    for process_id in range(2):
        env = subprocess_env(1)
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(process_id))
        processes.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=900)[0])
        finally:
            if process.poll() is None:
                process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    assert "process 1 of 2" in outputs[1] or "process 1 of 2" in outputs[0]
    # The console shows the run's own lines; TensorFlow's C++ notices and library warnings go to the log file.
    for output in outputs:
        assert "step 2/2" in output
        assert "oneDNN" not in output and "absl::InitializeLog" not in output, output[-3000:]
    assert "oneDNN" in (workdir / "logs" / "log.txt").read_text()
    # Process 0 scored both processes' images, gathered as shard files in eval/ that it deleted once read.
    assert "evaluation at step 2 on 2 images" in outputs[0], outputs[0][-3000:]
    assert sorted(p.name for p in (workdir / "eval").iterdir()) == ["step_00000002_per_class.txt",
                                                                    "step_00000002_results.json"]

    # The same two global batches on one process and one device.
    model = build_model(config.model)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state, tx = checkpointing.create_train_state(config, model)
    state = parallel.replicate(state, mesh)
    step = train.jit_train_step(model, tx, config, mesh)
    shards = [batches(config, 2, shard_index=i, shard_count=2, batch_size=1) for i in range(2)]
    for first, second in zip(*shards):
        global_rows = {k: np.concatenate([first[k], second[k]]) for k in first}
        state, _ = step(state, parallel.global_batch(global_rows, mesh, train.MODEL_INPUTS))

    # The two processes' evaluation equals one process evaluating the same checkpoint.
    (two_process_metrics,) = workdir_lib.read_eval_metrics(str(workdir))
    config.train.eval_only = True
    one_process_metrics = train.train_and_evaluate(config, str(workdir))
    assert two_process_metrics["step"] == 2
    for key, value in one_process_metrics.items():
        assert two_process_metrics[key] == pytest.approx(value, abs=1e-9), key
    with open(workdir_lib.eval_file(str(workdir), 2, "results.json")) as f:
        assert len(json.load(f)) > 0  # both processes' detections were gathered and scored

    restored, consumed = restored_state(config, str(workdir))
    assert int(restored.step) == 2 and consumed == 2
    for ours, reference in zip(jax.tree.leaves(jax.device_get(restored.params)),
                               jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-6)
