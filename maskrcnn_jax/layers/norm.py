"""Normalization layers for the backbone: FrozenBatchNorm, BatchNorm and GroupNorm behind one factory.

All three keep PyTorch's variable names and arithmetic, so a torchvision / detectron2 weight import is a rename:
  * ``frozen_bn``: ``weight``, ``bias``, ``running_mean``, ``running_var`` all in the ``batch_stats`` collection
    (torchvision's FrozenBatchNorm2d buffers), so the optimizer, which only sees ``params``, never touches them.
  * ``bn``: ``weight``, ``bias`` in ``params``; ``running_mean``, ``running_var`` in ``batch_stats``.
  * ``gn``: ``weight``, ``bias`` in ``params`` (32 groups).

Training code can treat every norm the same way: pass ``params`` and ``batch_stats`` in, and mark ``batch_stats``
mutable when training (FrozenBatchNorm hands its statistics back unchanged). Statistics are computed in float32
whatever the compute dtype.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

NORM_KINDS = ("frozen_bn", "bn", "gn")
GROUP_NORM_GROUPS = 32


def _affine(x, mean, var, weight, bias, eps, dtype):
    """(x - mean) / sqrt(var + eps) * weight + bias, folded into one scale and shift in float32, applied in dtype."""
    scale = weight * lax.rsqrt(var + eps)
    shift = bias - mean * scale
    return x.astype(dtype) * scale.astype(dtype) + shift.astype(dtype)


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed affine parameters and statistics (torchvision's FrozenBatchNorm2d)."""

    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]

        def stat(name, fill):
            return self.variable("batch_stats", name, lambda: jnp.full((channels,), fill, jnp.float32)).value

        weight, bias = stat("weight", 1.0), stat("bias", 0.0)
        return _affine(x, stat("running_mean", 0.0), stat("running_var", 1.0), weight, bias, self.eps, self.dtype)


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm2d over NHWC.

    With ``train``: normalises with the biased statistics of the whole batch (under jit with a global batch these
    are global, i.e. synchronised across devices) and updates ``running = (1 - momentum) * running + momentum * batch``
    with the unbiased variance, as torch does. Without: normalises with the running statistics.
    """

    train: bool = False
    momentum: float = 0.1
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "running_mean", lambda: jnp.zeros((channels,), jnp.float32))
        running_var = self.variable("batch_stats", "running_var", lambda: jnp.ones((channels,), jnp.float32))
        if not self.train:
            return _affine(x, running_mean.value, running_var.value, weight, bias, self.eps, self.dtype)

        reduce_axes = tuple(range(x.ndim - 1))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=reduce_axes)
        var = jnp.mean(jnp.square(x32 - mean), axis=reduce_axes)
        if not self.is_initializing():
            count = x.size // channels
            unbiased_var = var * (count / max(count - 1, 1))
            running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
            running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased_var
        return _affine(x, mean, var, weight, bias, self.eps, self.dtype)


class GroupNorm(nn.Module):
    """PyTorch's GroupNorm over NHWC: statistics per sample over (H, W, channels of the group)."""

    num_groups: int = GROUP_NORM_GROUPS
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"{channels} channels do not split into {self.num_groups} groups")
        weight = self.param("weight", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, channels // self.num_groups)
        reduce_axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = jnp.mean(grouped, axis=reduce_axes, keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=reduce_axes, keepdims=True)
        normalized = ((grouped - mean) * lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (normalized * weight + bias).astype(self.dtype)


def make_norm(kind: str, *, train: bool, eps: float = 1e-5, dtype: Any = jnp.float32, name: str | None = None):
    """Builds the norm layer ``kind`` (one of NORM_KINDS). ``train`` only matters for ``bn``."""
    if kind == "frozen_bn":
        return FrozenBatchNorm(eps=eps, dtype=dtype, name=name)
    if kind == "bn":
        return BatchNorm(train=train, eps=eps, dtype=dtype, name=name)
    if kind == "gn":
        return GroupNorm(eps=eps, dtype=dtype, name=name)
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORM_KINDS}")
