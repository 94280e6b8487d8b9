"""Helpers shared by the training, multi-process and inference tests (not a test module): the tiny configs/test.py
run on 64 px canvases of a few generated shapes, subprocess environments, batches and restored states."""

import os
import pathlib

import jax

from maskrcnn_jax import config as config_lib
from maskrcnn_jax.data import pipeline
from maskrcnn_jax.data.transforms import InputOptions
from maskrcnn_jax.engine import checkpointing, datasets, parallel

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / ".venv" / "jax_cache"


def tiny_config(data_root, **train_overrides):
    """configs/test.py on a 64 px canvas with its data under `data_root`."""
    config = config_lib.load(ROOT / "configs" / "test.py")
    config.data.data_dir = os.path.join(data_root, "tfds")
    config.data.shapes.dir = os.path.join(data_root, "shapes")
    config.data.shapes.num_train = 8
    config.data.shapes.num_val = 2
    config.data.canvas_size = (64, 64)
    config.train.final_eval = False
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    return config


def subprocess_env(devices=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_COMPILATION_CACHE_DIR"] = str(CACHE_DIR)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


def batches(config, count, shard_index=0, shard_count=1, batch_size=None, start_batch=0):
    builder, _ = datasets.prepare_dataset(config)
    iterator = pipeline.TrainIterator(builder, InputOptions.from_config(config.data),
                                      batch_size=batch_size or config.train.batch_size, seed=config.data.seed,
                                      shard_index=shard_index, shard_count=shard_count, start_batch=start_batch)
    return [next(iterator) for _ in range(count)]


def restored_state(config, workdir, step=None):
    mesh = parallel.make_mesh(jax.devices()[:1])
    abstract = jax.eval_shape(lambda: checkpointing.create_train_state(config)[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=parallel.replicated(mesh)),
                            abstract)
    manager = checkpointing.checkpoint_manager(workdir, config)
    try:
        return checkpointing.restore_checkpoint(manager, abstract, step)
    finally:
        manager.close()
