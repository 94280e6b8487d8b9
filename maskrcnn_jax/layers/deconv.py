"""The 2x2 stride-2 transposed convolution of the mask head, as one matmul and a pixel shuffle."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


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
