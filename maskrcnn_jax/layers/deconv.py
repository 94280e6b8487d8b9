"""Transposed convolutions: the mask head's 2x2 stride-2 one as one matmul and a pixel shuffle, and the general
PyTorch ConvTranspose2d the keypoint head needs (4x4, stride 2)."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from maskrcnn_jax.layers.conv import conv2d_transpose


class Deconv2x2(nn.Module):
    """A 2x2 stride-2 transposed convolution: out[2i + a, 2j + b] = x[i, j] @ kernel[a, b] + bias.

    The windows do not overlap, so it is one matmul and a pixel shuffle. XLA's CPU backend computes the kernel
    gradient of the equivalent lax.conv_transpose some 30x slower (19 s for 128 RoIs at 14x14x256).
    torchvision's ConvTranspose2d weight [C, O, 2, 2] is this kernel transposed to [2, 2, C, O]: no flip.
    """

    features: int
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (2, 2, channels, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        y = jnp.einsum("nhwc,abco->nhawbo", x, kernel)
        n, h, _, w, _, o = y.shape
        return y.reshape(n, 2 * h, 2 * w, o) + bias


class ConvTranspose(nn.Module):
    """PyTorch's ConvTranspose2d(in, features, kernel_size, stride, padding) in NHWC: output side
    (side - 1) * stride - 2 * padding + kernel_size. Computed as layers/conv.py's conv2d_transpose, the adjoint of
    a stride-`stride` conv from `features` to `in` channels, whose CPU gradients avoid XLA's transposed
    convolutions. The kernel is stored [k, k, in, features]: torchvision's weight [in, features, k, k] transposed
    (2, 3, 0, 1), no flip. in_conditional_branch: traced inside a lax.cond/switch branch (see layers/conv.py)."""

    features: int
    kernel_size: int
    stride: int
    padding: int
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    in_conditional_branch: bool = False

    @nn.compact
    def __call__(self, x):
        k, s, p = self.kernel_size, self.stride, self.padding
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        output_hw = tuple((side - 1) * s - 2 * p + k for side in x.shape[1:3])
        # The adjoint conv maps `features` channels to `in`: the stored kernel with in and out swapped.
        y = conv2d_transpose(x, kernel.transpose(0, 1, 3, 2), (s, s), ((p, p), (p, p)), output_hw,
                             self.in_conditional_branch)
        return y + bias
