"""The training loop: schedule, optimizer masks, NaN handling, resume, 1 vs 8 devices, and a SIGKILL during an
async checkpoint save. Runs the tiny configs/test.py model on 64 px canvases of a few generated shapes.

Tests that need 8 simulated devices or a killed process run this file as a script in a subprocess
(`python tests/test_train.py WORKER ARGS`), with XLA_FLAGS set before JAX is imported.
"""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import train
from maskrcnn_jax.data import pipeline
from maskrcnn_jax.data.transforms import InputOptions
from maskrcnn_jax.modeling.mask_rcnn import build_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / ".venv" / "jax_cache"


def tiny_config(data_root, **train_overrides):
    """configs/test.py on a 64 px canvas with its data under `data_root`."""
    spec = importlib.util.spec_from_file_location("test_config_file", ROOT / "configs" / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
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


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes_data"))
    train.prepare_data(tiny_config(root))
    return root


@pytest.fixture(scope="module")
def compiled(data_root):
    """One model, optimizer and compiled train step on a 1-device mesh, shared by the tests below."""
    config = tiny_config(data_root)
    model = build_model(config.model)
    mesh = train.make_mesh(jax.devices()[:1])
    state, tx = train.create_train_state(config, model)
    step = train.jit_train_step(model, tx, config, mesh)
    return config, model, mesh, train.replicate(state, mesh), step


def batches(config, count, shard_index=0, shard_count=1, batch_size=None, start_batch=0):
    builder = train.prepare_data(config)
    iterator = pipeline.TrainIterator(builder, InputOptions.from_config(config.data),
                                      batch_size=batch_size or config.train.batch_size, seed=config.data.seed,
                                      shard_index=shard_index, shard_count=shard_count, start_batch=start_batch)
    return [next(iterator) for _ in range(count)]


def restored_state(config, workdir, step=None):
    model = build_model(config.model)
    mesh = train.make_mesh(jax.devices()[:1])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.eval_shape(lambda: train.create_train_state(config, model)[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
    manager = train.checkpoint_manager(workdir, config)
    try:
        return train.restore_checkpoint(manager, abstract, step)
    finally:
        manager.close()


def assert_trees_equal(a, b, rtol=0.0):
    flat_a, tree_a = jax.tree.flatten(jax.device_get(a))
    flat_b, tree_b = jax.tree.flatten(jax.device_get(b))
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7 if rtol else 0)


# ----------------------------------------------------------------------------------------------------
# Optimizer pieces.


def test_learning_rate_follows_detectron2_warmup_multistep():
    config = tiny_config("/unused")
    t = config.train
    t.base_lr, t.warmup_steps, t.warmup_factor, t.lr_steps, t.lr_gamma = 0.02, 1000, 0.001, (60_000, 80_000), 0.1
    schedule = train.learning_rate_schedule(t)

    def detectron2(step):  # WarmupMultiStepLR with linear warmup
        alpha = step / 1000
        warmup = 0.001 * (1 - alpha) + alpha if step < 1000 else 1.0
        return 0.02 * warmup * 0.1 ** sum(step >= s for s in (60_000, 80_000))

    for step in (0, 1, 500, 999, 1000, 59_999, 60_000, 79_999, 80_000, 89_999):
        assert float(schedule(step)) == pytest.approx(detectron2(step), rel=1e-6), step


def test_no_decay_on_norms_or_biases_and_no_update_for_frozen_stages(rng):
    config = tiny_config("/unused")
    config.model.backbone.norm = "bn"
    config.model.backbone.freeze_at = 2
    config.train.weight_decay = 0.1
    model = build_model(config.model)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 2), jnp.int32))
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes["params"])
    tx = train.make_optimizer(config, params)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    flat = {jax.tree_util.keystr(path): np.asarray(u) for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
    # With zero gradients only weight decay moves anything: conv/dense kernels outside the frozen stages.
    for name, update in flat.items():
        frozen = "['body']['conv1']" in name or "['body']['layer1']" in name or "['body']['bn1']" in name
        decayed = name.endswith("['kernel']") and not frozen
        assert np.any(update != 0) == decayed, name
    # A real gradient does not reach frozen parameters either.
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert not np.any(np.asarray(updates["backbone"]["body"]["layer1"]["block_0"]["conv1"]["kernel"]))
    assert np.all(np.asarray(updates["backbone"]["body"]["layer2"]["block_0"]["bn1"]["weight"]) != 0)


# ----------------------------------------------------------------------------------------------------
# The step.


def test_a_non_finite_step_is_skipped_and_stops_the_run_naming_step_and_images(compiled):
    config, _, mesh, state, step = compiled
    local = batches(config, 1)[0]
    poisoned = dict(local, image=np.where(np.arange(64)[None, :, None, None] == 3, np.nan, local["image"]))
    params_before = jax.device_get(state.params)
    new_state, metrics = step(jax.tree.map(jnp.copy, state), train.global_batch(poisoned, mesh))
    assert not bool(metrics["finite"])
    assert int(new_state.step) == 1
    assert_trees_equal(new_state.params, params_before)

    progress = train.ProgressLog(train.MetricWriter.__new__(train.MetricWriter), 10, 2, 0)
    progress.add(7, metrics, local["image_id"])
    with pytest.raises(train.NonFiniteLossError) as error:
        progress.check()
    assert "step 7" in str(error.value)
    assert str(local["image_id"].tolist()) in str(error.value)


def test_steps_are_finite_and_change_the_parameters(compiled):
    config, _, mesh, state, step = compiled
    state = jax.tree.map(jnp.copy, state)
    before = jax.device_get(state.params)
    for local in batches(config, 2):
        state, metrics = step(state, train.global_batch(local, mesh))
        assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
        assert set(metrics) >= {"loss", "rpn_cls", "rpn_box", "box_cls", "box_reg", "mask", "grad_norm",
                                "learning_rate"}
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.any(np.asarray(a) != b), jax.device_get(state.params),
                                         before))
    # Nearly everything moves; a few slots (e.g. box deltas of classes absent from these batches) may not.
    assert np.mean(moved) > 0.9


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("beta", [0.0, 1.0 / 9])
def test_empty_and_crowd_only_images_train_finite(data_root, beta, dtype):
    """The whole jitted train step on a batch of an image without any instance and one with only a crowd region:
    every loss, the gradient norm and the new parameters are finite, for L1 and smooth-L1 box losses (torchvision's
    beta 1/9 once turned the zero-padded ground truth's infinite targets into NaN gradients) in f32 and bf16."""
    config = tiny_config(data_root)
    config.model.dtype = dtype
    config.model.rpn.box_loss_beta = config.model.roi_heads.box_loss_beta = beta
    model = build_model(config.model)
    mesh = train.make_mesh(jax.devices()[:1])
    state, tx = train.create_train_state(config, model)
    step = train.jit_train_step(model, tx, config, mesh)
    # A batch whose two images both have an instance, to turn into the two edge cases.
    local = dict(next(b for b in batches(config, 4) if b["gt_valid"].any(1).all()))
    valid = local["gt_valid"].copy()
    valid[0] = False  # image 0: no instance at all (padding only)
    valid[1, 1:] = False  # image 1: a single instance, made a crowd region
    crowd = np.zeros_like(valid)
    crowd[1, 0] = True
    local.update(gt_valid=valid, gt_is_crowd=crowd, gt_boxes=np.where(valid[..., None], local["gt_boxes"], 0.0),
                 gt_classes=np.where(valid, local["gt_classes"], 0))
    before = jax.device_get(state.params)
    new_state, metrics = step(train.replicate(state, mesh), train.global_batch(local, mesh))
    metrics = jax.device_get(metrics)
    assert bool(metrics["finite"]), metrics
    for name in ("loss", "rpn_cls", "rpn_box", "box_cls", "box_reg", "mask", "grad_norm"):
        assert np.isfinite(metrics[name]), (name, metrics)
    assert metrics["rpn_box"] == metrics["box_reg"] == metrics["mask"] == 0.0
    after = jax.device_get(new_state.params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after))
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))


# ----------------------------------------------------------------------------------------------------
# Resume.


class RecordingIterator(pipeline.TrainIterator):
    seen: list = []

    def __next__(self):
        batch = super().__next__()
        RecordingIterator.seen.append(batch["image_id"].tolist())
        return batch


def test_resume_equals_never_stopping(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "TrainIterator", RecordingIterator)
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")

    RecordingIterator.seen = []
    train.train_and_evaluate(tiny_config(data_root, num_steps=6, checkpoint_every=100), straight_dir)
    straight_batches = RecordingIterator.seen

    RecordingIterator.seen = []
    train.train_and_evaluate(tiny_config(data_root, num_steps=3, checkpoint_every=100), resumed_dir)
    train.train_and_evaluate(tiny_config(data_root, num_steps=6, checkpoint_every=100), resumed_dir)
    resumed_batches = RecordingIterator.seen

    assert len(straight_batches) == 6 and resumed_batches == straight_batches
    config = tiny_config(data_root)
    straight, straight_consumed = restored_state(config, straight_dir, 6)
    resumed, resumed_consumed = restored_state(config, resumed_dir, 6)
    assert straight_consumed == resumed_consumed == 6
    assert int(resumed.step) == 6
    assert_trees_equal(resumed, straight)


# ----------------------------------------------------------------------------------------------------
# 1 vs 8 devices, in a subprocess with 8 simulated CPU devices.


def worker_devices(data_root, out_path):
    config = tiny_config(data_root, batch_size=8)
    model = build_model(config.model)
    local_batches = batches(config, 3)
    results = {}
    for count in (1, 8):
        mesh = train.make_mesh(jax.devices()[:count])
        state, tx = train.create_train_state(config, model)
        state = train.replicate(state, mesh)
        step = train.jit_train_step(model, tx, config, mesh)
        losses = []
        for local in local_batches:
            state, metrics = step(state, train.global_batch(local, mesh))
            losses.append({k: float(v) for k, v in jax.device_get(metrics).items()})
        leaves = jax.tree.leaves(jax.device_get(state.params))
        results[count] = (losses, leaves, len(state.params["backbone"]["body"]["conv1"]["kernel"].sharding.device_set))
    np.savez(out_path, losses_1=json.dumps(results[1][0]), losses_8=json.dumps(results[8][0]),
             devices=np.asarray([results[1][2], results[8][2]]),
             **{f"p1_{i}": x for i, x in enumerate(results[1][1])}, **{f"p8_{i}": x for i, x in enumerate(results[8][1])})


def test_one_device_equals_eight_devices(data_root, tmp_path):
    out = tmp_path / "devices.npz"
    subprocess.run([sys.executable, __file__, "worker_devices", data_root, str(out)], env=subprocess_env(8),
                   check=True, timeout=900)
    result = np.load(out)
    assert result["devices"].tolist() == [1, 8]
    losses_1, losses_8 = json.loads(str(result["losses_1"])), json.loads(str(result["losses_8"]))
    for one, eight in zip(losses_1, losses_8):
        for key in ("loss", "rpn_cls", "rpn_box", "box_cls", "box_reg", "mask"):
            assert eight[key] == pytest.approx(one[key], rel=1e-4), key
    count = len([k for k in result.files if k.startswith("p1_")])
    for i in range(count):
        np.testing.assert_allclose(result[f"p8_{i}"], result[f"p1_{i}"], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# SIGKILL during an async save.


def test_sigkill_during_async_save_leaves_the_latest_complete_checkpoint_restorable(data_root, tmp_path):
    workdir = tmp_path / "killed"
    command = [sys.executable, "-m", "maskrcnn_jax.main", f"--config={ROOT / 'configs' / 'test.py'}",
               f"--workdir={workdir}", f"--config.data.data_dir={data_root}/tfds",
               f"--config.data.shapes.dir={data_root}/shapes", "--config.data.shapes.num_train=8",
               "--config.data.shapes.num_val=2", "--config.data.canvas_size=(64,64)",
               "--config.train.num_steps=10000", "--config.train.checkpoint_every=1",
               "--config.train.max_checkpoints_to_keep=2", "--config.train.final_eval=False"]
    process = subprocess.Popen(command, env=subprocess_env(1), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoints = workdir / "checkpoints"
    killed_during_save = False
    try:
        deadline = time.time() + 600
        while time.time() < deadline and process.poll() is None:
            entries = os.listdir(checkpoints) if checkpoints.exists() else []
            complete = [e for e in entries if e.isdigit()]
            if complete and any("tmp" in e for e in entries):
                process.send_signal(signal.SIGKILL)
                killed_during_save = True
                break
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert killed_during_save, "the run never had a complete checkpoint and a save in flight at once"
    assert any("tmp" in e for e in os.listdir(checkpoints))  # the interrupted save was left behind

    state, consumed = restored_state(tiny_config(data_root), str(workdir))
    step = int(state.step)
    assert step >= 1 and consumed == step
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


if __name__ == "__main__":
    jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
    globals()[sys.argv[1]](*sys.argv[2:])
