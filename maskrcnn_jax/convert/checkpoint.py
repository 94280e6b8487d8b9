"""Writing imported weights as a training checkpoint, so that every tool that reads a workdir can use them.

The checkpoint is exactly what `train.train_and_evaluate` writes and restores: Orbax `CheckpointManager` step 0 in
WORKDIR/checkpoints (items "state", a `train.TrainState` with the imported params and batch_stats, a fresh
optimizer state and the config's seed, and "data", the iterator position 0), plus WORKDIR/config.json. So:
  * a Predictor / evaluation restores it like any trained checkpoint;
  * `train_and_evaluate(config, WORKDIR)` resumes from it, i.e. fine-tunes from the imported weights.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from maskrcnn_jax.convert.finetune import merge_pretrained
from maskrcnn_jax.modeling.mask_rcnn import build_model

logger = logging.getLogger(__name__)


def model_variables(config: ml_collections.ConfigDict, imported: Mapping[str, Any]) -> dict:
    """The imported variables completed to the whole model of `config`: variables the import does not cover (the
    heads after a backbone-only import) and class-dependent layers of another size get their initialisation from
    `config.train.seed`, as training would."""
    from maskrcnn_jax import train

    model = build_model(config.model)
    canvas = tuple(config.data.canvas_size)
    template = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, *canvas, 3), jnp.float32), jnp.asarray([canvas], jnp.int32)
    )
    template = {"params": template["params"], "batch_stats": template.get("batch_stats", {})}
    variables, report = merge_pretrained(template, imported)
    if report.kept_initial or report.reinitialized:
        # Some variables need real values: the config's initialisation, as a fresh training run draws it.
        init_key, _ = jax.random.split(jax.random.key(config.train.seed))
        variables, report = merge_pretrained(train.init_variables(model, init_key, canvas), imported)
    logger.info("%s", report.summary())
    return variables


def write_checkpoint(workdir: str, config: ml_collections.ConfigDict, imported: Mapping[str, Any]) -> str:
    """Writes `imported` (an importer's output) as step 0 of WORKDIR/checkpoints; returns the checkpoint dir."""
    from maskrcnn_jax import train

    variables = model_variables(config, imported)
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = train.make_optimizer(config, params)
    _, step_key = jax.random.split(jax.random.key(config.train.seed))
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                             opt_state=tx.init(params), rng=jax.random.key_data(step_key))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    manager = train.checkpoint_manager(workdir, config)
    try:
        train.save_checkpoint(manager, state, 0)
        manager.wait_until_finished()
    finally:
        manager.close()
    return str(manager.directory)
