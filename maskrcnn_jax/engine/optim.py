"""The optimizer: learning-rate schedule, which parameters decay (and how much) and which are frozen, and the optax
chain."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from maskrcnn_jax.modeling.resnet import frozen_param_mask

from maskrcnn_jax.config import LR_SCHEDULES, OPTIMIZERS

# The three kinds of parameters that decay at their own rates (detectron2's WEIGHT_DECAY, WEIGHT_DECAY_BIAS and
# WEIGHT_DECAY_NORM): conv and dense kernels, their biases, and the scales and shifts of norm layers.
PARAMETER_KINDS = ("kernel", "bias", "norm")


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
    """The learning rate at a step, as detectron2's schedulers give it.

    "multistep" (WarmupMultiStepLR): base_lr * warmup(step) * gamma ** (number of lr_steps <= step), where warmup
    rises linearly from warmup_factor at step 0 to 1 at warmup_steps.
    "cosine" (WarmupParamScheduler over CosineParamScheduler): base_lr times a cosine from 1 at step 0 to
    lr_end_factor at num_steps; during warmup it rises linearly from warmup_factor * base_lr to the cosine's value
    at warmup_steps.
    """
    base_lr = float(train_config.base_lr)
    warmup_steps = int(train_config.warmup_steps)
    warmup_factor = float(train_config.warmup_factor)
    kind = train_config.get("lr_schedule", "multistep")
    if kind not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {kind!r}")

    if kind == "cosine":
        num_steps = max(int(train_config.num_steps), 1)
        end = float(train_config.lr_end_factor)

        def cosine(step):
            progress = jnp.minimum(step / num_steps, 1.0)
            return end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))

        def schedule(step):
            step = jnp.asarray(step, jnp.float32)
            if warmup_steps <= 0:
                return base_lr * cosine(step)
            alpha = jnp.minimum(step / warmup_steps, 1.0)
            warmup = warmup_factor * (1.0 - alpha) + cosine(float(warmup_steps)) * alpha
            return base_lr * jnp.where(step < warmup_steps, warmup, cosine(step))

        return schedule

    # NumPy, not jnp: a schedule built under a trace (the optimizer of an eval_shape'd state) must hold no tracer.
    boundaries = np.asarray(tuple(train_config.lr_steps) or (np.iinfo(np.int32).max,), np.int32)
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


def parameter_kinds(params: Mapping[str, Any]) -> Any:
    """Each parameter's PARAMETER_KINDS entry. A module with a `kernel` is a conv or dense layer (its `bias` is a
    bias); one with a `weight` is a norm layer (its `weight` and `bias` are norm parameters)."""

    def walk(tree):
        is_norm = "weight" in tree and "kernel" not in tree
        return {name: walk(value) if isinstance(value, Mapping) else
                ("norm" if is_norm else "kernel" if name == "kernel" else "bias")
                for name, value in tree.items()}

    return walk(params)


def decayed_weights(train_config: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
    """L2 weight decay at train.weight_decay on kernels, train.weight_decay_bias on biases and
    train.weight_decay_norm on norm parameters (added to the gradient, or to Adam's update for AdamW)."""
    kinds = parameter_kinds(params)
    rates = {"kernel": train_config.weight_decay, "bias": train_config.get("weight_decay_bias", 0.0),
             "norm": train_config.get("weight_decay_norm", 0.0)}
    return optax.chain(*[optax.add_decayed_weights(rate, mask=jax.tree.map(lambda k, kind=kind: k == kind, kinds))
                         for kind, rate in rates.items() if rate])


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
    gradient (PyTorch SGD, as detectron2) or AdamW (decoupled decay); frozen backbone stages receive no update."""
    t = config.train
    schedule = learning_rate_schedule(t)
    if t.optimizer == "sgd":
        core = optax.chain(decayed_weights(t, params), optax.sgd(schedule, momentum=t.momentum))
    elif t.optimizer == "adamw":  # optax.adamw's own chain, with a decay rate per parameter kind
        core = optax.chain(optax.scale_by_adam(), decayed_weights(t, params), optax.scale_by_learning_rate(schedule))
    else:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {t.optimizer!r}")
    if t.grad_clip_norm > 0:
        core = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), core)
    labels = trainable_labels(params, config.model.backbone.freeze_at)
    return optax.multi_transform({"trainable": core, "frozen": optax.set_to_zero()}, labels)
