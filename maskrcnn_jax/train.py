"""Training: `train_and_evaluate(config, workdir)` and the pieces it is made of.

Data parallelism is one `jax.jit` over a 1-D `Mesh(devices, ('data',))`: the batch is sharded `P('data')`, the
train state is replicated and donated. Every process reads its own shard of the training data; the global
batch is assembled with `jax.make_array_from_process_local_data`. The same code runs on one CPU, 8 GPUs or a
TPU pod.

Checkpoints (Orbax, WORKDIR/checkpoints) hold the whole TrainState (params, BN statistics, optimizer, step, RNG)
and the data-iterator position; a restarted run resumes from the latest. The newest
`train.max_checkpoints_to_keep` are kept, and the one with the best mask AP besides. SIGTERM (preemption)
saves a checkpoint and stops.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maskrcnn_jax import config as config_lib
from maskrcnn_jax import evaluation, inference
from maskrcnn_jax.data import builder as data_builder
from maskrcnn_jax.data import pipeline, synthetic
from maskrcnn_jax.data.transforms import InputOptions
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN, build_model
from maskrcnn_jax.modeling.resnet import frozen_param_mask

# The fields of a training batch the model reads; the rest (image ids, geometry) stays on the host.
MODEL_INPUTS = ("image", "image_size", "gt_boxes", "gt_classes", "gt_is_crowd", "gt_valid", "gt_masks")
BEST_METRIC = "segm_AP"


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer steps taken (= batches consumed)
    params: Any
    batch_stats: Any  # FrozenBN / BN statistics; {} for GroupNorm models
    opt_state: Any
    rng: jax.Array  # uint32 raw key data (checkpointable), split once per step

    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}


# ----------------------------------------------------------------------------------------------------
# Optimizer.


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
    """detectron2's WarmupMultiStepLR: base_lr * warmup(step) * gamma ** (number of lr_steps <= step), where
    warmup rises linearly from warmup_factor at step 0 to 1 at warmup_steps."""
    base_lr = float(train_config.base_lr)
    warmup_steps = int(train_config.warmup_steps)
    warmup_factor = float(train_config.warmup_factor)
    boundaries = jnp.asarray(tuple(train_config.lr_steps) or (np.iinfo(np.int32).max,), jnp.int32)
    gamma = float(train_config.lr_gamma)

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        if warmup_steps > 0:
            alpha = jnp.minimum(step.astype(jnp.float32) / warmup_steps, 1.0)
            warmup = warmup_factor * (1.0 - alpha) + alpha
        else:
            warmup = 1.0
        decays = jnp.sum(step >= boundaries) if train_config.lr_steps else 0
        return base_lr * warmup * gamma ** decays

    return schedule


def weight_decay_mask(params) -> Any:
    """True for conv and dense kernels: no decay on norm parameters or biases (detectron2 WEIGHT_DECAY_NORM=0)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def trainable_labels(params, freeze_at: int) -> Any:
    """'frozen' for the backbone stages below freeze_at, 'trainable' elsewhere (for optax.multi_transform)."""
    labels = jax.tree.map(lambda _: "trainable", params)
    body = params.get("backbone", {}).get("body")
    if body is not None and freeze_at > 0:
        frozen = frozen_param_mask(body, freeze_at)
        labels["backbone"]["body"] = jax.tree.map(lambda f: "frozen" if f else "trainable", frozen)
    return labels


def make_optimizer(config: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
    """The optax chain: optional global-norm clipping, then SGD with momentum and L2 weight decay added to the
    gradient (PyTorch SGD, as detectron2) or AdamW; frozen backbone stages receive no update at all."""
    t = config.train
    schedule = learning_rate_schedule(t)
    decay_mask = weight_decay_mask(params)
    if t.optimizer == "sgd":
        core = optax.chain(optax.add_decayed_weights(t.weight_decay, mask=decay_mask),
                           optax.sgd(schedule, momentum=t.momentum))
    elif t.optimizer == "adamw":
        core = optax.adamw(schedule, weight_decay=t.weight_decay, mask=decay_mask)
    else:
        raise ValueError(f"train.optimizer must be one of {config_lib.OPTIMIZERS}, got {t.optimizer!r}")
    if t.grad_clip_norm > 0:
        core = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), core)
    labels = trainable_labels(params, config.model.backbone.freeze_at)
    return optax.multi_transform({"trainable": core, "frozen": optax.set_to_zero()}, labels)


# ----------------------------------------------------------------------------------------------------
# State and step.


def init_variables(model: MaskRCNN, key: jax.Array, canvas_size) -> dict[str, Any]:
    """Parameters and statistics. Traced once under jit on the host's default device (every process computes the
    same values from the same key)."""
    images = jnp.zeros((1, *canvas_size, 3), jnp.float32)
    sizes = jnp.asarray([canvas_size], jnp.int32)
    variables = jax.jit(model.init)(key, images, sizes)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def create_train_state(config: ml_collections.ConfigDict, model: MaskRCNN,
                       tx: optax.GradientTransformation | None = None) -> tuple[TrainState, optax.GradientTransformation]:
    init_key, step_key = jax.random.split(jax.random.key(config.train.seed))
    variables = init_variables(model, init_key, tuple(config.data.canvas_size))
    tx = tx or make_optimizer(config, variables["params"])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                       rng=jax.random.key_data(step_key))
    return state, tx


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: MaskRCNN,
               tx: optax.GradientTransformation, schedule: Callable) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch. A step whose loss or gradients are not finite leaves parameters,
    statistics and optimizer untouched (and reports finite=False), so a checkpoint never holds NaNs."""
    rng, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))

    def loss_fn(params):
        (total, losses), updates = model.apply({"params": params, "batch_stats": state.batch_stats}, batch,
                                               step_key, method=model.losses, mutable=["batch_stats"])
        return total, (losses, updates.get("batch_stats", state.batch_stats))

    (total, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           batch_stats=keep(batch_stats, state.batch_stats),
                           opt_state=keep(opt_state, state.opt_state), rng=jax.random.key_data(rng))
    metrics = {"loss": total, **losses, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "finite": finite}
    return new_state, metrics


def make_mesh(devices=None) -> Mesh:
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def jit_train_step(model: MaskRCNN, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                   mesh: Mesh) -> Callable:
    replicated = NamedSharding(mesh, P())
    step = functools.partial(train_step, model=model, tx=tx, schedule=learning_rate_schedule(config.train))
    return jax.jit(step, in_shardings=(replicated, NamedSharding(mesh, P("data"))),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def replicate(tree, mesh: Mesh):
    """Host (or single-device) arrays that are equal on every process -> global arrays replicated over the mesh."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, keys=MODEL_INPUTS) -> dict[str, jax.Array]:
    """This process' rows of the batch -> global arrays sharded over the mesh's 'data' axis."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, local_batch[k]) for k in keys}


# ----------------------------------------------------------------------------------------------------
# Checkpoints.


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True,
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(config.train.max_checkpoints_to_keep),
            policies.BestN(get_metric_fn=lambda metrics: metrics[BEST_METRIC], n=1,
                           keep_checkpoints_without_metrics=False),
        ]),
    )
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 item_names=("state", "data"), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, batches_consumed: int,
                    metrics: Mapping[str, float] | None = None) -> None:
    step = int(jax.device_get(state.step))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=ocp.args.JsonSave({"batches_consumed": batches_consumed})),
                 metrics=dict(metrics) if metrics else None, force=True)


def restore_checkpoint(manager: ocp.CheckpointManager, state: TrainState, step: int | None = None
                       ) -> tuple[TrainState, int]:
    """(state, batches_consumed) of checkpoint `step` (default: the latest), restored with `state`'s shapes and
    shardings."""
    step = manager.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             data=ocp.args.JsonRestore()))
    return restored["state"], int(restored["data"]["batches_consumed"])


class PreemptionWatcher:
    """Turns SIGTERM into a request to checkpoint and stop at the next step boundary. With several processes JAX's
    preemption sync point makes every process agree on the same step."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: no handler, as with any library code
                self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------------------------------
# Logging.


class NonFiniteLossError(FloatingPointError):
    pass


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricWriter:
    """TensorBoard scalars on process 0 only, written with TensorFlow's own event writer (TensorFlow is installed for
    the input pipeline; the `tensorboard` package, which tf.summary.scalar needs, is not required)."""

    def __init__(self, logdir: str):
        self._writer = None
        if jax.process_index() == 0:
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2

            self._tf = tf
            self._metadata = summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
            self._writer = tf.summary.create_file_writer(logdir)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default():
            for name, value in scalars.items():
                self._tf.summary.write(name, self._tf.constant(float(value), self._tf.float32), step=step,
                                       metadata=self._metadata)
        self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()


class ProgressLog:
    """Collects per-step device metrics without syncing, and every `log_every` steps fetches them, checks that
    every step was finite, and logs the means plus images/s and an ETA."""

    def __init__(self, writer: MetricWriter, num_steps: int, global_batch_size: int, start_step: int):
        self.writer = writer
        self.num_steps = num_steps
        self.global_batch_size = global_batch_size
        self.pending: list[tuple[int, dict[str, jax.Array], np.ndarray]] = []
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.start_time = time.perf_counter()
        self.start_step = start_step

    def add(self, step: int, metrics: dict[str, jax.Array], image_ids: np.ndarray) -> None:
        """`step` is the step number after the update (1-based); image_ids this process' ids of its batch."""
        self.pending.append((step, metrics, image_ids))
        self.window_steps += 1

    def check(self) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Fetches pending metrics; raises NonFiniteLossError naming the first bad step and its image ids."""
        fetched = [(step, jax.device_get(metrics), ids) for step, metrics, ids in self.pending]
        self.pending = []
        for step, metrics, ids in fetched:
            if not bool(metrics["finite"]):
                losses = {k: float(v) for k, v in metrics.items() if k not in ("finite", "learning_rate")}
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {step} (the update was skipped); image ids of this "
                    f"process' batch: {ids.tolist()}; values: {losses}")
        return [(step, metrics) for step, metrics, _ in fetched]

    def flush(self) -> None:
        fetched = self.check()
        if not fetched:
            return
        now = time.perf_counter()
        step = fetched[-1][0]
        means = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[0][1] if k != "finite"}
        means["learning_rate"] = float(fetched[-1][1]["learning_rate"])
        images_per_second = self.window_steps * self.global_batch_size / max(now - self.window_start, 1e-9)
        done = step - self.start_step
        eta = (now - self.start_time) / max(done, 1) * (self.num_steps - step)
        losses = " ".join(f"{k} {v:.4f}" for k, v in means.items()
                          if k not in ("loss", "grad_norm", "learning_rate"))
        logging.info("step %d/%d (%.1f%%) | loss %.4f | %s | lr %.3g | grad_norm %.3g | %.2f img/s | ETA %s",
                     step, self.num_steps, 100.0 * step / self.num_steps, means["loss"], losses,
                     means["learning_rate"], means["grad_norm"], images_per_second, _format_duration(eta))
        self.writer.write(step, {**{f"train/{k}": v for k, v in means.items()},
                                 "train/images_per_second": images_per_second})
        self.window_start, self.window_steps = now, 0


# ----------------------------------------------------------------------------------------------------
# Data.


def prepare_data(config: ml_collections.ConfigDict):
    """Generates the synthetic shapes when configured, builds the TFDS dataset if needed (process 0; the others
    wait for it), and returns the builder."""
    data = config.data
    if data.shapes.num_train > 0:
        if not data.shapes.dir:
            raise ValueError("data.shapes.num_train > 0 needs data.shapes.dir, where the shapes are written")
        with data.unlocked():
            paths = synthetic.shapes_data_paths(data.shapes.dir)
            for key, path in paths.items():
                setattr(data, key, path)
    if not data.data_dir:
        raise ValueError("data.data_dir must name the folder for the built dataset")
    if jax.process_index() == 0:
        if data.shapes.num_train > 0:
            synthetic.generate(data.shapes.dir, data.shapes.num_train, data.shapes.num_val, data.shapes.seed)
        data_builder.build(data)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dataset built")
    return data_builder.get_builder(data)


def _check_batch_size(batch_size: int, name: str, mesh: Mesh) -> int:
    if batch_size % mesh.size or batch_size % jax.process_count():
        raise ValueError(f"{name}={batch_size} must be divisible by the {mesh.size} devices and "
                         f"{jax.process_count()} processes")
    return batch_size // jax.process_count()


# ----------------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float] | None:
    """Trains up to `config.train.num_steps` steps (resuming from WORKDIR/checkpoints), evaluating every
    `train.eval_every` steps and after the last (`train.final_eval`); with `train.eval_only` only evaluates.
    The last step is always checkpointed. Returns the last evaluation's metrics (evaluation.METRIC_KEYS) or None."""
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh()
    local_batch_size = _check_batch_size(config.train.batch_size, "train.batch_size", mesh)
    _check_batch_size(config.eval.batch_size, "eval.batch_size", mesh)
    builder = prepare_data(config)
    categories = data_builder.load_category_map(builder)
    if config.model.num_classes != categories.num_classes + 1:
        raise ValueError(f"model.num_classes is {config.model.num_classes} but the dataset has "
                         f"{categories.num_classes} categories: set --config.model.num_classes="
                         f"{categories.num_classes + 1} (the background counts)")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        inference.write_categories(workdir, categories)

    model = build_model(config.model)
    state, tx = create_train_state(config, model)
    state = replicate(state, mesh)
    manager = checkpoint_manager(workdir, config)
    batches_consumed = 0
    if manager.latest_step() is not None:
        state, batches_consumed = restore_checkpoint(manager, state)
        logging.info("resumed from %s at step %d", manager.directory, int(jax.device_get(state.step)))
    evaluator = evaluation.Evaluator(config, builder, categories, mesh, model, workdir)

    if config.train.eval_only:
        metrics = evaluator.evaluate(state.variables(), int(jax.device_get(state.step)))
        manager.close()
        return metrics

    options = InputOptions.from_config(config.data)
    iterator = pipeline.TrainIterator(builder, options, batch_size=local_batch_size, seed=config.data.seed,
                                      shard_index=jax.process_index(), shard_count=jax.process_count(),
                                      start_batch=batches_consumed, split=config.data.train_split)
    step_fn = jit_train_step(model, tx, config, mesh)
    writer = MetricWriter(os.path.join(workdir, "tensorboard"))
    start_step = int(jax.device_get(state.step))
    num_steps = config.train.num_steps
    progress = ProgressLog(writer, num_steps, config.train.batch_size, start_step)
    preemption = PreemptionWatcher()
    metrics = None
    logging.info("training steps %d..%d on %d devices (%d processes), %d images per step", start_step + 1,
                 num_steps, mesh.size, jax.process_count(), config.train.batch_size)
    try:
        for step in range(start_step + 1, num_steps + 1):
            local = next(iterator)
            state, step_metrics = step_fn(state, global_batch(local, mesh))
            progress.add(step, step_metrics, local["image_id"])
            is_last = step == num_steps
            if step % config.train.log_every == 0 or is_last:
                progress.flush()
            evaluate_now = ((is_last and config.train.final_eval)
                            or (config.train.eval_every > 0 and step % config.train.eval_every == 0))
            if evaluate_now:
                progress.check()
                metrics = evaluator.evaluate(state.variables(), step)
                writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
                save_checkpoint(manager, state, iterator.batches_consumed, metrics)
            elif step % config.train.checkpoint_every == 0 or is_last:
                progress.check()
                save_checkpoint(manager, state, iterator.batches_consumed)
            if not is_last and preemption.should_stop(step):
                progress.check()
                save_checkpoint(manager, state, iterator.batches_consumed)
                logging.warning("preemption requested: saved step %d to %s and stopping", step, manager.directory)
                break
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        preemption.close()
    return metrics


def read_eval_metrics(workdir: str) -> list[dict[str, float]]:
    """The lines of WORKDIR/eval_metrics.jsonl, oldest first."""
    path = os.path.join(workdir, evaluation.METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)
