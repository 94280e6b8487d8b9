"""layers/pooling.max_pool against lax.reduce_window's autodiff and against torch's max_pool2d, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from maskrcnn_jax.layers.pooling import max_pool

# (input shape, window, strides, padding): the ResNet stem's pool, odd sizes, a rectangular window and stride.
CASES = [
    ((2, 9, 11, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((1, 16, 12, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((1, 10, 7, 4), (2, 3), (2, 1), ((0, 1), (1, 0))),
    ((2, 8, 8, 2), (2, 2), (2, 2), ((0, 0), (0, 0))),
]


def reference_pool(x, window, strides, padding):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *padding, (0, 0)))


@pytest.mark.parametrize("shape, window, strides, padding", CASES)
def test_forward_and_gradient_match_reduce_window(rng, shape, window, strides, padding):
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)  # continuous values: no ties
    out = jax.jit(max_pool, static_argnums=(1, 2, 3))(x, window, strides, padding)
    np.testing.assert_array_equal(out, reference_pool(x, window, strides, padding))
    cotangent = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)

    def grad(pool):
        return jax.jit(jax.grad(lambda x: jnp.sum(pool(x, window, strides, padding) * cotangent)))(x)

    np.testing.assert_allclose(grad(max_pool), grad(reference_pool), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 9, 11, 5), (1, 14, 10, 3)])
def test_ties_send_the_gradient_where_torch_does(rng, shape):
    # Integers in 0..2 (and ReLU zeros, as after the stem) tie in most windows; torch gives the whole gradient to the
    # first maximum in row-major window order.
    x = rng.integers(0, 3, shape).astype(np.float32)
    out = max_pool(jnp.asarray(x), (3, 3), (2, 2), ((1, 1), (1, 1)))
    cotangent = rng.standard_normal(out.shape).astype(np.float32)
    grad = jax.grad(lambda x: jnp.sum(max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))) * cotangent))(jnp.asarray(x))

    x_t = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    out_t = torch.nn.functional.max_pool2d(x_t, 3, 2, 1)
    out_t.backward(torch.from_numpy(cotangent.transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(np.asarray(out), out_t.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(grad), x_t.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


def test_negative_padding_is_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        max_pool(jnp.ones((1, 4, 4, 1)), (2, 2), (2, 2), ((-1, 0), (0, 0)))
