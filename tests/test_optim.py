"""The optimizer pieces of engine/optim.py: detectron2's schedules and its three weight-decay rates."""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import config as config_lib
from maskrcnn_jax.engine import optim
from maskrcnn_jax.modeling.mask_rcnn import build_model

ROOT = pathlib.Path(__file__).resolve().parent.parent


def train_config(**values):
    config = config_lib.base_config().train
    for key, value in values.items():
        setattr(config, key, value)
    return config


def test_cosine_schedule_follows_detectron2_warmup_cosine():
    t = train_config(lr_schedule="cosine", base_lr=0.02, num_steps=1000, warmup_steps=100, warmup_factor=0.001,
                     lr_end_factor=0.05)
    schedule = optim.learning_rate_schedule(t)

    def cosine(step):  # fvcore CosineParamScheduler(1, 0.05) at step / num_steps
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / 1000))

    def detectron2(step):  # WarmupParamScheduler: linear from factor * sched(0) to sched(warmup end), then sched
        if step < 100:
            alpha = step / 100
            return 0.02 * (0.001 * cosine(0) * (1 - alpha) + cosine(100) * alpha)
        return 0.02 * cosine(step)

    for step in (0, 1, 50, 99, 100, 101, 500, 999, 1000, 1200):
        assert float(schedule(step)) == pytest.approx(detectron2(min(step, 1000)), rel=1e-5, abs=1e-9), step


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="lr_schedule"):
        optim.learning_rate_schedule(train_config(lr_schedule="linear"))


def tiny_params(rng):
    config = config_lib.load(ROOT / "configs" / "test.py")
    config.model.backbone.norm = "bn"
    model = build_model(config.model)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 2), jnp.int32))
    return config, jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes["params"])


def test_parameter_kinds_tell_kernels_biases_and_norms_apart(rng):
    _, params = tiny_params(rng)
    kinds = optim.parameter_kinds(params)
    body = kinds["backbone"]["body"]
    assert body["conv1"]["kernel"] == "kernel"
    assert body["bn1"] == {"weight": "norm", "bias": "norm"}
    assert kinds["rpn_head"]["conv"] == {"kernel": "kernel", "bias": "bias"}
    assert set(jax.tree.leaves(kinds)) == set(optim.PARAMETER_KINDS)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_each_kind_decays_at_its_own_rate(rng, optimizer):
    """With zero gradients an update is weight decay alone: -lr * rate * p for SGD (PyTorch's L2 in the gradient,
    momentum starting from zero) and for AdamW (decoupled decay, Adam's own step is 0 on a zero gradient)."""
    config, params = tiny_params(rng)
    t = config.train
    t.optimizer, t.base_lr, t.warmup_steps, t.lr_steps = optimizer, 0.5, 0, ()
    t.weight_decay, t.weight_decay_bias, t.weight_decay_norm = 0.1, 0.01, 0.001
    config.model.backbone.freeze_at = 0
    tx = optim.make_optimizer(config, params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    rates = {"kernel": 0.1, "bias": 0.01, "norm": 0.001}
    for update, param, kind in zip(jax.tree.leaves(updates), jax.tree.leaves(params),
                                   jax.tree.leaves(optim.parameter_kinds(params))):
        np.testing.assert_allclose(update, -0.5 * rates[kind] * np.asarray(param), rtol=1e-5, atol=1e-7)
