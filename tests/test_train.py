"""The training loop: schedule, optimizer masks, NaN handling, resume, 1 vs 8 devices, and a SIGKILL during an
async checkpoint save. Runs the tiny configs/test.py model on 64 px canvases of a few generated shapes.

Tests that need 8 simulated devices or a killed process run this file as a script in a subprocess
(`python tests/test_train.py WORKER ARGS`), with XLA_FLAGS set before JAX is imported.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import train
from maskrcnn_jax.data import pipeline, synthetic
from maskrcnn_jax.engine import checkpointing, datasets, optim, parallel, progress
from maskrcnn_jax.modeling.mask_rcnn import build_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_training import CACHE_DIR, ROOT, batches, restored_state, subprocess_env, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes_data"))
    datasets.prepare_dataset(tiny_config(root))
    return root


@pytest.fixture(scope="module")
def compiled(data_root):
    """One model, optimizer and compiled train step on a 1-device mesh, shared by the tests below."""
    config = tiny_config(data_root)
    model = build_model(config.model)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state, tx = checkpointing.create_train_state(config, model)
    step = train.jit_train_step(model, tx, config, mesh)
    return config, model, mesh, parallel.replicate(state, mesh), step


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
    schedule = optim.learning_rate_schedule(t)

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
    tx = optim.make_optimizer(config, params)
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
    # A float canvas is taken as normalised already (only uint8 ones are normalised in the step): a NaN row in it.
    image = np.where(np.arange(64)[None, :, None, None] == 3, np.nan, local["image"]).astype(np.float32)
    poisoned = dict(local, image=image)
    params_before = jax.device_get(state.params)
    new_state, metrics = step(jax.tree.map(jnp.copy, state), parallel.global_batch(poisoned, mesh, train.MODEL_INPUTS))
    assert not bool(metrics["finite"])
    assert int(new_state.step) == 1
    assert_trees_equal(new_state.params, params_before)

    log = progress.ProgressLog(progress.MetricWriter.__new__(progress.MetricWriter), 10, 2, 0)
    log.add(7, metrics, local["image_id"])
    with pytest.raises(progress.NonFiniteLossError) as error:
        log.check()
    assert "step 7" in str(error.value)
    assert str(local["image_id"].tolist()) in str(error.value)


def nonfinite_metrics(finite):
    return {"loss": np.float32(1.0 if finite else np.nan), "grad_norm": np.float32(1.0),
            "learning_rate": np.float32(0.1), "finite": np.bool_(finite)}


def test_skip_mode_counts_non_finite_steps_and_stops_after_too_many_in_a_row():
    log = progress.ProgressLog(progress.MetricWriter.__new__(progress.MetricWriter), 10, 2, 0, on_nonfinite="skip",
                               max_consecutive_skips=3)
    ids = np.asarray([11, 12])
    for step, finite in enumerate([True, False, False, True, False, False], start=1):
        log.add(step, nonfinite_metrics(finite), ids)
    kept = log.check()  # two runs of two skips: counted, never three in a row
    assert [step for step, _ in kept] == [1, 4]
    assert log.skipped_steps == 4 and log.consecutive_skips == 2
    log.add(7, nonfinite_metrics(False), ids)
    with pytest.raises(progress.NonFiniteLossError, match="3 non-finite steps in a row.*step 7.*11, 12"):
        log.check()


def test_the_moving_average_follows_the_parameters(data_root):
    config = tiny_config(data_root)
    config.train.ema_decay = 0.75
    model = build_model(config.model)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state, tx = checkpointing.create_train_state(config, model)
    step = train.jit_train_step(model, tx, config, mesh)
    state = parallel.replicate(state, mesh)
    expected = jax.device_get(state.params)
    for local in batches(config, 2):
        state, metrics = step(state, parallel.global_batch(local, mesh, train.MODEL_INPUTS))
        assert bool(metrics["finite"])
        expected = jax.tree.map(lambda e, p: 0.75 * e + 0.25 * p, expected, jax.device_get(state.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(state.ema_params), expected)
    assert state.variables()["params"] is state.ema_params


class FakeManager:
    directory = "/work/run/checkpoints"

    def __init__(self, steps):
        self.steps = steps

    def all_steps(self):
        return self.steps


def test_eval_only_needs_a_checkpoint_and_takes_eval_step():
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.evaluated_step(FakeManager([]), None)
    assert train.evaluated_step(FakeManager([4, 2]), None) == 4
    assert train.evaluated_step(FakeManager([4, 2]), 2) == 2
    with pytest.raises(ValueError, match=r"eval.step=3 .* steps \[2, 4\]"):
        train.evaluated_step(FakeManager([4, 2]), 3)


def test_eval_only_in_an_empty_workdir_is_an_error(data_root, tmp_path):
    config = tiny_config(data_root)
    config.train.eval_only = True
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.train_and_evaluate(config, str(tmp_path / "empty"))


def test_explicit_dataset_paths_and_generated_shapes_together_are_an_error(data_root):
    config = tiny_config(data_root)
    config.data.train_json = "/data/mine/train.json"
    with pytest.raises(ValueError, match="data.train_json.*data.shapes.num_train=0"):
        datasets.dataset_sources(config.data)
    config.data.shapes.num_train = 0
    assert datasets.dataset_sources(config.data)["train_json"] == "/data/mine/train.json"


def test_half_empty_training_images_train_with_torchvisions_smooth_l1(data_root, tmp_path):
    """Issue 13's acceptance: a COCO-format set where half the training images have no annotation trains with the
    torchvision config's box losses (smooth-L1, beta 1/9) without stopping."""
    paths = synthetic.shapes_data_paths(os.path.join(data_root, "shapes"))
    with open(paths["train_json"]) as f:
        coco = json.load(f)
    emptied = {image["id"] for image in coco["images"][::2]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] not in emptied]
    train_json = tmp_path / "half_empty_train.json"
    train_json.write_text(json.dumps(coco))
    config = tiny_config(data_root, num_steps=6, checkpoint_every=100)
    config.data.shapes.num_train = 0
    config.data.name = "half_empty"
    config.data.train_json, config.data.train_images = str(train_json), paths["train_images"]
    config.data.val_json, config.data.val_images = paths["val_json"], paths["val_images"]
    config.model.rpn.box_loss_beta = config.model.roi_heads.box_loss_beta = 1.0 / 9
    train.train_and_evaluate(config, str(tmp_path / "run"))
    state, consumed = restored_state(config, str(tmp_path / "run"))
    assert int(state.step) == 6 and consumed == 6
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_steps_are_finite_and_change_the_parameters(compiled):
    config, _, mesh, state, step = compiled
    state = jax.tree.map(jnp.copy, state)
    before = jax.device_get(state.params)
    for local in batches(config, 2):
        state, metrics = step(state, parallel.global_batch(local, mesh, train.MODEL_INPUTS))
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
    mesh = parallel.make_mesh(jax.devices()[:1])
    state, tx = checkpointing.create_train_state(config, model)
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
    new_state, metrics = step(parallel.replicate(state, mesh), parallel.global_batch(local, mesh, train.MODEL_INPUTS))
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
        mesh = parallel.make_mesh(jax.devices()[:count])
        state, tx = checkpointing.create_train_state(config, model)
        state = parallel.replicate(state, mesh)
        step = train.jit_train_step(model, tx, config, mesh)
        losses = []
        for local in local_batches:
            state, metrics = step(state, parallel.global_batch(local, mesh, train.MODEL_INPUTS))
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
        # Against each tensor's scale, not elementwise: the conv weight gradients sum the batch in another order on 1
        # and 8 devices, and after three steps float32 rounding leaves ~2e-6 on elements whose value is near zero.
        one, eight = result[f"p1_{i}"], result[f"p8_{i}"]
        np.testing.assert_allclose(eight, one, rtol=0, atol=1e-6 + 1e-4 * float(np.max(np.abs(one))))


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
