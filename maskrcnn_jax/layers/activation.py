"""A ReLU whose backward keeps one bit per element: the sign of its input, packed eight to a byte.

Autodiff of ``jax.nn.relu`` reads its input in the backward (``where(x > 0, g, 0)``). XLA does not keep that input
as a buffer: it keeps whatever the input was computed from and fuses the recomputation into the backward. Behind a
conv with a fixed affine norm (FrozenBatchNorm) or a bias, that is the conv's float output, kept next to the ReLU's
output (which the next layer's weight gradient needs anyway): two float maps per layer where torch keeps one. Here the
backward reads packed bits of ``x > 0`` instead, which XLA cannot recompute by fusion because packing is a reduction;
the conv output dies in the forward. On the R50 body at 800x1344 (frozen BN) that cuts XLA's temporaries for the
forward and backward from 1786 to 1047 MiB, a little faster; see benchmarks/RESULTS.md.

Behind a norm whose own backward reads the conv output (train-mode BatchNorm, GroupNorm) the conv output stays alive
anyway, so the bits save nothing and cost a pack and an unpack: use ``nn.relu`` there.

The gradient is autodiff's exactly (0 where x <= 0, also at x == 0, as torch's relu). Being a ``jax.custom_vjp``, it
supports reverse mode (``grad``, ``vjp``) and ``vmap`` but not forward mode (``jvp``, ``jacfwd``).
"""

import jax
import jax.numpy as jnp


def _relu(x):
    return jnp.maximum(x, jnp.zeros((), x.dtype))


@jax.custom_vjp
def bit_mask_relu(x):
    """max(x, 0), with a backward that keeps sign bits rather than a float map (see the module docstring)."""
    return _relu(x)


def _bit_mask_relu_fwd(x):
    return _relu(x), jnp.packbits(x > 0, axis=-1)


def _bit_mask_relu_bwd(sign_bits, grad):
    positive = jnp.unpackbits(sign_bits, axis=-1, count=grad.shape[-1]).astype(bool)
    return (jnp.where(positive, grad, jnp.zeros((), grad.dtype)),)


bit_mask_relu.defvjp(_bit_mask_relu_fwd, _bit_mask_relu_bwd)
