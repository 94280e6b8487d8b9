"""The train state and its Orbax checkpoints.

A checkpoint (WORKDIR/checkpoints/<step>) holds the whole TrainState (params, BN statistics, optimizer state,
step, RNG) as item "state" and the data-iterator position as item "data". The newest
`train.max_checkpoints_to_keep` are kept, and the one with the best mask AP besides. Saves are asynchronous; a save
interrupted by a kill leaves a temporary folder that Orbax ignores, so the latest complete checkpoint survives.
One `create_train_state` serves training, the weight importers and prediction.

A workdir is not trusted to be whole. A checkpoint that does not restore (truncated or overwritten files, a missing
item) raises CheckpointRestoreError naming its step and folder; a resume (`restore_latest`) then warns and falls back
to the newest one that restores, and only when none does stops with an error naming each. A save that fails (a full
or read-only disk) raises CheckpointSaveError naming the step, the folder and the OS error, whether it fails at once
or in Orbax's background thread (then at the next save or at `close_manager`); the checkpoints before it stay whole.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import weakref
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import struct
from jax.experimental import multihost_utils

from maskrcnn_jax.engine import optim, workdir as workdir_lib
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN, build_model


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer steps taken (= batches consumed)
    params: Any
    batch_stats: Any  # FrozenBN / BN statistics; {} for GroupNorm models
    opt_state: Any
    rng: jax.Array  # uint32 raw key data (checkpointable), split once per step
    ema_params: Any = struct.field(default_factory=dict)  # train.ema_decay > 0: the moving average; else {}

    def variables(self) -> dict[str, Any]:
        """The variables evaluation and prediction use: the moving average of the parameters when it is kept."""
        params = self.ema_params if jax.tree.leaves(self.ema_params) else self.params
        return {"params": params, "batch_stats": self.batch_stats}


def init_variables(model: MaskRCNN, key: jax.Array, canvas_size) -> dict[str, Any]:
    """Parameters and statistics. Traced once under jit on the host's default device (every process computes the
    same values from the same key)."""
    images = jnp.zeros((1, *canvas_size, 3), jnp.float32)
    sizes = jnp.asarray([canvas_size], jnp.int32)
    variables = jax.jit(model.init)(key, images, sizes)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def init_keys(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """(parameter-init key, first step key), both from train.seed."""
    init_key, step_key = jax.random.split(jax.random.key(config.train.seed))
    return init_key, step_key


def create_train_state(config: ml_collections.ConfigDict, model: MaskRCNN | None = None,
                       variables: Mapping[str, Any] | None = None,
                       tx: optax.GradientTransformation | None = None
                       ) -> tuple[TrainState, optax.GradientTransformation]:
    """Step 0 of training: `variables` (imported weights, say) or a fresh initialisation from train.seed, a fresh
    optimizer state, and the step RNG from train.seed."""
    model = model or build_model(config.model)
    init_key, step_key = init_keys(config)
    if variables is None:
        variables = init_variables(model, init_key, tuple(config.data.canvas_size))
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    tx = tx or optim.make_optimizer(config, params)
    ema_params = jax.tree.map(jnp.copy, params) if config.train.ema_decay > 0 else {}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params), rng=jax.random.key_data(step_key), ema_params=ema_params)
    return state, tx


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    policies = ocp.checkpoint_managers
    metric = workdir_lib.best_metric(config.model)
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True,
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(config.train.max_checkpoints_to_keep),
            policies.BestN(get_metric_fn=lambda metrics: metrics[metric], n=1,
                           keep_checkpoints_without_metrics=False),
        ]),
    )
    return ocp.CheckpointManager(workdir_lib.checkpoint_dir(workdir), item_names=("state", "data"), options=options)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (its step, folder and the underlying error in the message)."""


class CheckpointRestoreError(RuntimeError):
    """A checkpoint could not be restored (its step, folder and the underlying error in the message)."""


# The step each manager's asynchronous save is writing, so that an error surfacing later names it.
_SAVING: "weakref.WeakKeyDictionary[ocp.CheckpointManager, int]" = weakref.WeakKeyDictionary()


def _describe(error: BaseException, limit: int = 400) -> str:
    """`error` in one line: its type, its errno's name if it has one, and its message cut to `limit` characters
    (TensorStore's messages end in a long JSON spec)."""
    code = getattr(error, "errno", None)
    name = f" ({errno.errorcode[code]})" if isinstance(code, int) and code in errno.errorcode else ""
    message = " ".join(str(error).split())
    message = message if len(message) <= limit else message[:limit] + "..."
    return f"{type(error).__name__}{name}: {message}"


def _save_error(manager: ocp.CheckpointManager, step: int | None, error: BaseException) -> CheckpointSaveError:
    which = f"step {step}" if step is not None else "a checkpoint"
    kept = manager.latest_step()
    kept = f"the last complete checkpoint, step {kept}, is untouched" if kept is not None else "no earlier checkpoint"
    return CheckpointSaveError(
        f"could not save {which} to {manager.directory} ({_describe(error)}); {kept}. Make room on (or give write "
        f"access to) {manager.directory} and rerun: training resumes from the last complete checkpoint")


def finish_saves(manager: ocp.CheckpointManager) -> None:
    """Waits for the asynchronous save in flight; a failure of it raises CheckpointSaveError naming its step."""
    step = _SAVING.pop(manager, None)
    try:
        manager.wait_until_finished()
    except Exception as error:
        raise _save_error(manager, step, error) from error


def close_manager(manager: ocp.CheckpointManager, quiet: bool = False) -> None:
    """Finishes the save in flight and closes `manager`. A failed save raises CheckpointSaveError, or with `quiet`
    (another error is already on its way) is only logged. The manager is closed either way."""
    error = None
    try:
        finish_saves(manager)
    except CheckpointSaveError as e:
        error = e
    try:
        manager.close()
    except Exception as e:  # the failed save's error once more, or a failure to close
        if error is None:
            error = _save_error(manager, None, e)
            error.__cause__ = e
    if error is not None:
        if not quiet:
            raise error
        logging.error("%s", error)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, batches_consumed: int,
                    metrics: Mapping[str, float] | None = None) -> None:
    """Starts the asynchronous save of `state` (after the previous save has finished). An error, of this save's
    start or of the previous save, raises CheckpointSaveError."""
    step = int(jax.device_get(state.step))
    finish_saves(manager)
    try:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave({"batches_consumed": batches_consumed})),
                     metrics=dict(metrics) if metrics else None, force=True)
    except Exception as error:
        raise _save_error(manager, step, error) from error
    _SAVING[manager] = step


def restore_checkpoint(manager: ocp.CheckpointManager, state: TrainState, step: int | None = None
                       ) -> tuple[TrainState, int]:
    """(state, batches_consumed) of checkpoint `step` (default: the latest), restored with `state`'s shapes and
    shardings (concrete arrays or ShapeDtypeStructs). A checkpoint that does not restore raises
    CheckpointRestoreError naming it."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 data=ocp.args.JsonRestore()))
        batches_consumed = int(restored["data"]["batches_consumed"])
    except Exception as error:
        raise CheckpointRestoreError(f"checkpoint step {step} in {manager.directory} does not restore "
                                     f"({_describe(error)})") from error
    return restored["state"], batches_consumed


def _all_processes_agree(ok: bool) -> bool:
    """True if `ok` on every process (so that they all resume from the same step)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def restore_latest(manager: ocp.CheckpointManager, state: TrainState, set_aside_dir: str | None = None
                   ) -> tuple[TrainState, int] | None:
    """(state, batches_consumed) of the newest checkpoint that restores, or None if there is no checkpoint.

    A newer checkpoint that does not restore is logged (its step, folder and error) and skipped; if an older one
    restores, the skipped ones are moved into `set_aside_dir` (when given, by process 0), out of the way of the new
    saves of their steps. If none restores, CheckpointRestoreError names each; nothing is moved then, since the
    cause may be the config rather than the files."""
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    failures: list[tuple[int, CheckpointRestoreError]] = []
    for step in steps:
        try:
            restored = restore_checkpoint(manager, state, step)
            ok = True
        except CheckpointRestoreError as error:
            restored, ok = error, False
        if not _all_processes_agree(ok):
            if ok:
                restored = CheckpointRestoreError(f"checkpoint step {step} in {manager.directory} does not restore "
                                                  "on another process (see its log)")
            logging.warning("%s; trying the checkpoint before it", restored)
            failures.append((step, restored))
            continue
        if failures:
            skipped = ", ".join(str(s) for s, _ in failures)
            logging.warning("resuming from step %d in %s: the newer checkpoint(s) %s do not restore", step,
                            manager.directory, skipped)
            if set_aside_dir is not None:
                _set_aside(manager, [s for s, _ in failures], set_aside_dir)
        return restored
    details = "; ".join(str(error) for _, error in failures)
    raise CheckpointRestoreError(
        f"no checkpoint in {manager.directory} restores: {details}. If the config changed since they were written, "
        f"restore it; else move {manager.directory} away to train from scratch")


def _set_aside(manager: ocp.CheckpointManager, steps: list[int], set_aside_dir: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(set_aside_dir, exist_ok=True)
        for step in steps:
            source = os.path.join(str(manager.directory), str(step))
            target = os.path.join(set_aside_dir, str(step))
            suffix = 1
            while os.path.exists(target):
                target = os.path.join(set_aside_dir, f"{step}.{suffix}")
                suffix += 1
            shutil.move(source, target)
            logging.warning("moved the unreadable checkpoint step %d to %s", step, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("unreadable checkpoints set aside")
    manager.reload()


def write_initial_checkpoint(workdir: str, config: ml_collections.ConfigDict, state: TrainState) -> str:
    """Saves `state` as step 0 of WORKDIR/checkpoints (an import), holding the workdir's training lock; returns the
    checkpoint directory."""
    with workdir_lib.TrainingLock(workdir):
        manager = checkpoint_manager(workdir, config)
        try:
            save_checkpoint(manager, state, 0)
        except BaseException:
            close_manager(manager, quiet=True)
            raise
        close_manager(manager)
    return str(manager.directory)


def restore_variables(workdir: str, config: ml_collections.ConfigDict, step: int | None = None
                      ) -> tuple[dict[str, Any], int]:
    """({'params', 'batch_stats'}, step) of WORKDIR/checkpoints at `step` (default: the best by mask AP, else the
    latest), on this host's first device. With train.ema_decay > 0 the params are the moving average."""
    manager = checkpoint_manager(workdir, config)
    try:
        if step is None:
            available = manager.all_steps()
            if not available:
                raise FileNotFoundError(f"no checkpoint in {manager.directory}")
            step = workdir_lib.best_step(workdir, available, manager.latest_step(),
                                         workdir_lib.best_metric(config.model))
        abstract = jax.eval_shape(lambda: create_train_state(config)[0])
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
        state, _ = restore_checkpoint(manager, abstract, step)
    finally:
        manager.close()
    return state.variables(), int(step)


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
