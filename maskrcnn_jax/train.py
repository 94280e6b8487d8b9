"""Training: `train_step` and `train_and_evaluate(config, workdir)`, composed from the engine.

Data parallelism is one `jax.jit` over a 1-D `Mesh(devices, ('data',))` (engine.parallel): the batch is sharded
`P('data')`, the train state is replicated and donated. A run holds WORKDIR/train.lock while it trains
(engine.workdir.TrainingLock; with several processes process 0 holds it for all), resumes from the newest checkpoint
in WORKDIR/checkpoints that restores (engine.checkpointing), saves on SIGTERM, and evaluates with
evaluation.CocoEvaluator. train.eval_only only reads the checkpoints and takes no lock.

The step and its jit need no TensorFlow: the input pipeline and the evaluator (which do) are imported by
`train_and_evaluate` itself, so the step runs where only JAX is installed (benchmarks/accelerator.py).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from maskrcnn_jax import config as config_lib
from maskrcnn_jax import ops
from maskrcnn_jax.data.options import InputOptions
from maskrcnn_jax.engine import checkpointing, optim, parallel, progress, workdir as workdir_lib
from maskrcnn_jax.engine.checkpointing import TrainState
from maskrcnn_jax.layers import host_memory
from maskrcnn_jax.layers.compile_options import compiler_options
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN, build_model

# The fields of a training batch the model reads; the rest (image ids, geometry) stays on the host.
MODEL_INPUTS = ("image", "image_size", "gt_boxes", "gt_classes", "gt_is_crowd", "gt_valid", "gt_masks")


def model_inputs(model_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """MODEL_INPUTS, with gt_keypoints when the keypoint head trains."""
    return MODEL_INPUTS + (("gt_keypoints",) if model_config.keypoint_on else ())


def check_dataset_fits_model(config: ml_collections.ConfigDict, builder, categories):
    """The model's class count (and keypoint count) must be the dataset's; the error says what to set. Returns the
    dataset's keypoint schema for a keypoint model, else None."""
    if config.model.num_classes != categories.num_classes + 1:
        raise ValueError(f"model.num_classes is {config.model.num_classes} but the dataset has "
                         f"{categories.num_classes} categories: set --config.model.num_classes="
                         f"{categories.num_classes + 1} (the background counts)")
    if not config.model.keypoint_on:
        return None
    from maskrcnn_jax.data import coco_dataset

    schema = coco_dataset.load_keypoint_schema(builder)
    if schema is None:
        raise ValueError(f"model.keypoint_on is set but dataset {builder.data_dir} has no keypoint annotations")
    if config.model.keypoint_head.num_keypoints != schema.num_keypoints:
        raise ValueError(f"model.keypoint_head.num_keypoints is {config.model.keypoint_head.num_keypoints} but the "
                         f"dataset has {schema.num_keypoints} keypoint types: set "
                         f"--config.model.keypoint_head.num_keypoints={schema.num_keypoints}")
    return schema


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: MaskRCNN,
               tx: optax.GradientTransformation, schedule: Callable, ema_decay: float = 0.0,
               pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0)) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch. A step whose loss or gradients are not finite leaves parameters,
    statistics, optimizer and moving average untouched (and reports finite=False), so a checkpoint never holds NaNs.
    With ema_decay > 0 the moving average of the parameters follows: ema = decay * ema + (1 - decay) * params.
    uint8 images (the input pipeline's default) are normalised here, with pixel_mean and pixel_std."""
    rng, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    batch = {**batch, "image": ops.normalize_canvas(batch["image"], batch["image_size"], pixel_mean, pixel_std)}

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
    ema_params = state.ema_params
    if ema_decay > 0:
        ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           batch_stats=keep(batch_stats, state.batch_stats),
                           opt_state=keep(opt_state, state.opt_state), rng=jax.random.key_data(rng),
                           ema_params=keep(ema_params, state.ema_params))
    metrics = {"loss": total, **losses, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "finite": finite}
    return new_state, metrics


def jit_train_step(model: MaskRCNN, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                   mesh: Mesh) -> Callable:
    step = functools.partial(train_step, model=model, tx=tx, schedule=optim.learning_rate_schedule(config.train),
                             ema_decay=float(config.train.ema_decay), pixel_mean=tuple(config.data.pixel_mean),
                             pixel_std=tuple(config.data.pixel_std))
    replicated = parallel.replicated(mesh)
    return jax.jit(step, in_shardings=(replicated, parallel.batch_sharded(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=0,
                   compiler_options=compiler_options())


def make_predict_fn(model: MaskRCNN, mesh: Mesh) -> Callable:
    """predict(variables, this process' rows of an eval batch) -> this process' rows of MaskRCNN.predict."""
    batch = parallel.batch_sharded(mesh)
    network = jax.jit(lambda variables, images, sizes: model.apply(variables, images, sizes, method=model.predict),
                      in_shardings=(parallel.replicated(mesh), batch, batch), out_shardings=batch,
                      compiler_options=compiler_options())

    def predict(variables, local_batch):
        inputs = parallel.global_batch(local_batch, mesh, ("image", "image_size"))
        outputs = network(variables, inputs["image"], inputs["image_size"])
        return {k: parallel.local_rows(v) for k, v in outputs.items()}

    return predict


def evaluated_step(manager, step: int | None) -> int:
    """The checkpoint train.eval_only evaluates: `step` (eval.step), else the latest; an error if there is none."""
    available = sorted(manager.all_steps())
    if not available:
        raise FileNotFoundError(f"train.eval_only: there is no checkpoint in {manager.directory} to evaluate; train "
                                "first, or import weights with python -m maskrcnn_jax.convert")
    if step is None:
        return available[-1]
    if step not in available:
        raise ValueError(f"eval.step={step} is not a checkpoint in {manager.directory}; it has steps {available}")
    return int(step)


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds WORKDIR/train.lock for the run. All processes of a run share one workdir, so process 0 alone takes the
    lock and tells the others whether it got it: a second run stops on every process, before any of them writes."""
    lock = workdir_lib.TrainingLock(workdir)
    if jax.process_count() == 1:
        with lock:
            yield
        return
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except workdir_lib.WorkdirLockedError as e:
            error = e
    locked = bool(multihost_utils.broadcast_one_to_all(np.asarray(error is None, np.int32)))
    if error is not None:
        raise error
    if not locked:
        raise workdir_lib.WorkdirLockedError(f"process 0 could not lock {workdir}: another run holds it (process "
                                             "0's log names it)")
    try:
        yield
    finally:
        lock.release()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float] | None:
    """Trains up to `config.train.num_steps` steps (resuming from WORKDIR/checkpoints), evaluating every
    `train.eval_every` steps and after the last (`train.final_eval`); with `train.eval_only` only evaluates the
    checkpoint `eval.step` (default: the latest), which must exist. The last step is always checkpointed. Returns the
    last evaluation's metrics (coco.METRIC_KEYS) or None. Training holds the workdir's lock (`workdir_lock`): a
    second run on the same workdir raises WorkdirLockedError naming the first; evaluation only reads and takes none."""
    config_lib.validate(config)
    if config.train.eval_only:
        return _train_and_evaluate(config, workdir)
    with workdir_lock(workdir):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float] | None:
    from maskrcnn_jax.data import coco_dataset, pipeline
    from maskrcnn_jax.engine import datasets
    from maskrcnn_jax.evaluation.evaluator import CocoEvaluator

    mesh = parallel.make_mesh()
    local_batch_size = parallel.local_batch_size(config.train.batch_size, "train.batch_size", mesh)
    parallel.local_batch_size(config.eval.batch_size, "eval.batch_size", mesh)
    builder, sources = datasets.prepare_dataset(config)
    categories = coco_dataset.load_category_map(builder)
    keypoint_schema = check_dataset_fits_model(config, builder, categories)
    if jax.process_index() == 0 and not config.train.eval_only:
        workdir_lib.write_config(workdir, config)
        workdir_lib.write_categories(workdir, categories)
        if keypoint_schema is not None:
            workdir_lib.write_keypoint_schema(workdir, keypoint_schema)

    model = build_model(config.model)
    state, tx = checkpointing.create_train_state(config, model)
    state = parallel.replicate(state, mesh)
    manager = checkpointing.checkpoint_manager(workdir, config)
    evaluator = CocoEvaluator(config, builder, sources, categories, workdir, keypoint_schema)
    predict = make_predict_fn(model, mesh)

    def evaluate(state, step):
        return evaluator.evaluate(functools.partial(predict, state.variables()), step)

    if config.train.eval_only:
        try:
            step = evaluated_step(manager, config.eval.step)
            state, _ = checkpointing.restore_checkpoint(manager, state, step)
            return evaluate(state, step)
        finally:
            manager.close()

    batches_consumed = 0
    try:
        resumed = checkpointing.restore_latest(manager, state, workdir_lib.unreadable_checkpoint_dir(workdir))
    except BaseException:
        manager.close()
        raise
    if resumed is not None:
        state, batches_consumed = resumed
        logging.info("resumed from %s at step %d", manager.directory, int(jax.device_get(state.step)))

    options = InputOptions.from_config(config.data)
    iterator = pipeline.TrainIterator(builder, options, batch_size=local_batch_size, seed=config.data.seed,
                                      shard_index=jax.process_index(), shard_count=jax.process_count(),
                                      start_batch=batches_consumed, split=config.data.train_split)
    step_fn = jit_train_step(model, tx, config, mesh)
    inputs = model_inputs(config.model)
    writer = progress.MetricWriter(workdir_lib.tensorboard_dir(workdir))
    start_step = int(jax.device_get(state.step))
    num_steps = config.train.num_steps
    log = progress.ProgressLog(writer, num_steps, config.train.batch_size, start_step, config.train.on_nonfinite,
                               config.train.max_consecutive_skips)
    preemption = checkpointing.PreemptionWatcher()
    metrics = None
    logging.info("training steps %d..%d on %d devices (%d processes), %d images per step", start_step + 1,
                 num_steps, mesh.size, jax.process_count(), config.train.batch_size)
    batches = parallel.device_batches(iterator, num_steps - start_step, mesh, inputs)
    failed = True
    try:
        for step, (local, batch) in zip(range(start_step + 1, num_steps + 1), batches):
            if step == start_step + 1:
                # So that the step's buffers do not come on top of the compiler's freed memory (layers/host_memory.py).
                host_memory.compile_ahead(step_fn, state, batch)
            state, step_metrics = step_fn(state, batch)
            consumed = batches_consumed + step - start_step  # the iterator itself has read ahead
            log.add(step, step_metrics, local["image_id"])
            is_last = step == num_steps
            if step % config.train.log_every == 0 or is_last:
                log.flush()
            evaluate_now = ((is_last and config.train.final_eval)
                            or (config.train.eval_every > 0 and step % config.train.eval_every == 0))
            if evaluate_now:
                log.check()
                metrics = evaluate(state, step)
                writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
                checkpointing.save_checkpoint(manager, state, consumed, metrics)
            elif step % config.train.checkpoint_every == 0 or is_last:
                log.check()
                checkpointing.save_checkpoint(manager, state, consumed)
            if not is_last and preemption.should_stop(step):
                log.check()
                checkpointing.save_checkpoint(manager, state, consumed)
                logging.warning("preemption requested: saved step %d to %s and stopping", step, manager.directory)
                break
        failed = False
    finally:
        # A save that fails in Orbax's background thread raises here (the last one) or at the next save; with an
        # error already on its way it is only logged.
        try:
            checkpointing.close_manager(manager, quiet=failed)
        finally:
            writer.close()
            preemption.close()
    return metrics
