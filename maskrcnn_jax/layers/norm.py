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

import functools
from typing import Any

import flax.linen as nn
import jax
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


def _group_sums(per_channel, num_groups):
    """[B, C] -> [B, G]: the sum over each group's channels."""
    return per_channel.reshape(per_channel.shape[0], num_groups, -1).sum(-1)


def _per_channel(per_group, channels):
    """[B, G] -> [B, C]: each group's value repeated over its channels."""
    return jnp.repeat(per_group, channels // per_group.shape[1], axis=1)


def _spatial(per_sample_channel, ndim):
    """[B, C] -> [B, 1, ..., 1, C], broadcastable against an input of ndim dimensions."""
    return per_sample_channel.reshape(per_sample_channel.shape[0], *(1,) * (ndim - 2), per_sample_channel.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x, weight, bias, num_groups, eps, dtype):
    """PyTorch's GroupNorm over [B, ..., C]: statistics per sample over the spatial axes and the group's channels,
    in float32; the output in ``dtype``. A ``jax.custom_vjp``: reverse mode (``grad``, ``vjp``) and ``vmap``, not
    forward mode (``jvp``), as layers/conv.py."""
    return _group_norm_forward(x, weight, bias, num_groups, eps, dtype)[0]


def _group_norm_statistics(x32, num_groups):
    """Mean and 1/std per (sample, group), [B, G], two passes (the variance about the mean, as torch computes it)."""
    axes = tuple(range(1, x32.ndim - 1))
    count = x32.size // x32.shape[0] // num_groups
    mean = _group_sums(x32.sum(axes), num_groups) / count
    centered = x32 - _spatial(_per_channel(mean, x32.shape[-1]), x32.ndim)
    var = _group_sums(jnp.square(centered).sum(axes), num_groups) / count
    return mean, var


def _group_norm_forward(x, weight, bias, num_groups, eps, dtype):
    channels = x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean, var = _group_norm_statistics(x32, num_groups)
    rstd = lax.rsqrt(var + eps)
    # One scale and shift per (sample, channel): the output is a single multiply-add over x.
    scale = _per_channel(rstd, channels) * weight
    shift = bias - _per_channel(mean, channels) * scale
    y = (x32 * _spatial(scale, x.ndim) + _spatial(shift, x.ndim)).astype(dtype)
    return y, (x, weight, mean, rstd)


def _group_norm_backward(num_groups, eps, dtype, residuals, grad):
    """The closed form: with xhat = (x - mean) * rstd and d = grad * weight,
    dx = rstd * (d - mean_group(d) - xhat * mean_group(d * xhat)); per (sample, channel) it needs only the sums of
    grad and of grad * (x - mean) over the spatial axes, so one reduction pass over (grad, x) and one
    multiply-add pass make the whole backward."""
    x, weight, mean, rstd = residuals
    channels = x.shape[-1]
    axes = tuple(range(1, x.ndim - 1))
    x32, grad32 = x.astype(jnp.float32), grad.astype(jnp.float32)
    mean_c, rstd_c = _per_channel(mean, channels), _per_channel(rstd, channels)
    grad_sum = grad32.sum(axes)  # [B, C]
    grad_centered_sum = (grad32 * (x32 - _spatial(mean_c, x.ndim))).sum(axes)  # [B, C]
    bias_grad = grad_sum.sum(0)
    weight_grad = (grad_centered_sum * rstd_c).sum(0)
    count = x.size // x.shape[0] // num_groups
    mean_d = _group_sums(grad_sum * weight, num_groups) / count  # mean_group(d), [B, G]
    mean_d_xhat = _group_sums(grad_centered_sum * weight, num_groups) * rstd / count  # mean_group(d * xhat)
    # dx = grad * (rstd w) + x * (-rstd^2 mean_d_xhat) + (rstd^2 mean_d_xhat mean - rstd mean_d)
    x_coefficient = -rstd * rstd * mean_d_xhat
    offset = -x_coefficient * mean - rstd * mean_d
    grad_x = (grad32 * _spatial(rstd_c * weight, x.ndim) + x32 * _spatial(_per_channel(x_coefficient, channels), x.ndim)
              + _spatial(_per_channel(offset, channels), x.ndim))
    return grad_x.astype(x.dtype), weight_grad, bias_grad


group_norm.defvjp(_group_norm_forward, _group_norm_backward)


class GroupNorm(nn.Module):
    """PyTorch's GroupNorm over NHWC: statistics per sample over (H, W, channels of the group). Its backward is
    written out (group_norm): autodiff of the normalisation takes several more passes over the activations."""

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
        return group_norm(x, weight, bias, self.num_groups, self.eps, self.dtype)


def make_norm(kind: str, *, train: bool, eps: float = 1e-5, dtype: Any = jnp.float32, name: str | None = None):
    """Builds the norm layer ``kind`` (one of NORM_KINDS). ``train`` only matters for ``bn``."""
    if kind == "frozen_bn":
        return FrozenBatchNorm(eps=eps, dtype=dtype, name=name)
    if kind == "bn":
        return BatchNorm(train=train, eps=eps, dtype=dtype, name=name)
    if kind == "gn":
        return GroupNorm(eps=eps, dtype=dtype, name=name)
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORM_KINDS}")
