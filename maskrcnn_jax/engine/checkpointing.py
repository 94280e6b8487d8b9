"""The train state and its Orbax checkpoints.

A checkpoint (WORKDIR/checkpoints/<step>) holds the whole TrainState (params, BN statistics, optimizer state,
step, RNG) as item "state" and the data-iterator position as item "data". The newest
`train.max_checkpoints_to_keep` are kept, and the one with the best mask AP besides. Saves are asynchronous; a save
interrupted by a kill leaves a temporary folder that Orbax ignores, so the latest complete checkpoint survives.
One `create_train_state` serves training, the weight importers and prediction.
"""

from __future__ import annotations

import signal
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
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


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, batches_consumed: int,
                    metrics: Mapping[str, float] | None = None) -> None:
    step = int(jax.device_get(state.step))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=ocp.args.JsonSave({"batches_consumed": batches_consumed})),
                 metrics=dict(metrics) if metrics else None, force=True)


def restore_checkpoint(manager: ocp.CheckpointManager, state: TrainState, step: int | None = None
                       ) -> tuple[TrainState, int]:
    """(state, batches_consumed) of checkpoint `step` (default: the latest), restored with `state`'s shapes and
    shardings (concrete arrays or ShapeDtypeStructs)."""
    step = manager.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             data=ocp.args.JsonRestore()))
    return restored["state"], int(restored["data"]["batches_consumed"])


def write_initial_checkpoint(workdir: str, config: ml_collections.ConfigDict, state: TrainState) -> str:
    """Saves `state` as step 0 of WORKDIR/checkpoints (an import); returns the checkpoint directory."""
    manager = checkpoint_manager(workdir, config)
    try:
        save_checkpoint(manager, state, 0)
        manager.wait_until_finished()
    finally:
        manager.close()
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
