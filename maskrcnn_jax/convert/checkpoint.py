"""Writing imported weights as a training checkpoint, so that every tool that reads a workdir can use them.

The checkpoint is exactly what `train.train_and_evaluate` writes and restores: step 0 of WORKDIR/checkpoints, a
`TrainState` from engine.checkpointing.create_train_state with the imported params and batch_stats (a fresh
optimizer state, the config's seed), plus WORKDIR/config.json. So:
  * a Predictor / evaluation restores it like any trained checkpoint;
  * `train_and_evaluate(config, WORKDIR)` resumes from it, i.e. fine-tunes from the imported weights.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from maskrcnn_jax.convert.finetune import merge_pretrained
from maskrcnn_jax.engine import checkpointing, workdir as workdir_lib
from maskrcnn_jax.modeling.mask_rcnn import build_model

logger = logging.getLogger(__name__)


def model_variables(config: ml_collections.ConfigDict, imported: Mapping[str, Any]) -> dict:
    """The imported variables completed to the whole model of `config`: variables the import does not cover (the
    heads after a backbone-only import) and class-dependent layers of another size get their initialisation from
    `config.train.seed`, as training would."""
    model = build_model(config.model)
    canvas = tuple(config.data.canvas_size)
    template = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, *canvas, 3), jnp.float32), jnp.asarray([canvas], jnp.int32)
    )
    template = {"params": template["params"], "batch_stats": template.get("batch_stats", {})}
    variables, report = merge_pretrained(template, imported)
    if report.kept_initial or report.reinitialized:
        # Some variables need real values: the config's initialisation, as a fresh training run draws it.
        init_key, _ = checkpointing.init_keys(config)
        variables, report = merge_pretrained(checkpointing.init_variables(model, init_key, canvas), imported)
    logger.info("%s", report.summary())
    return variables


def write_checkpoint(workdir: str, config: ml_collections.ConfigDict, imported: Mapping[str, Any]) -> str:
    """Writes `imported` (an importer's output) as step 0 of WORKDIR/checkpoints; returns the checkpoint dir."""
    state, _ = checkpointing.create_train_state(config, variables=model_variables(config, imported))
    workdir_lib.write_config(workdir, config)
    return checkpointing.write_initial_checkpoint(workdir, config, state)
