"""layers/activation.bit_mask_relu: forward and gradient against jax.nn.relu and torch.relu (exact, including at
x == 0), under jit and vmap, and the memory it exists for: XLA's temporaries for a frozen-BN ResNet-50 body's
forward and backward, against the same body with nn.relu."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.layers.activation import bit_mask_relu
from maskrcnn_jax.modeling import resnet

# Last-axis sizes that are and are not multiples of the 8 bits packed into a byte.
SHAPES = [(2, 5, 7, 64), (3, 13), (4, 6, 3), (257,)]


def random_input(rng, shape, dtype=np.float32):
    """Normal values with a fifth of them exactly zero, where ReLU's gradient is a convention (0, as torch)."""
    x = rng.normal(size=shape).astype(np.float32)
    x[rng.random(shape) < 0.2] = 0.0
    return jnp.asarray(x, dtype)


def gradient(relu, x, cotangent):
    return jax.grad(lambda v: jnp.sum(relu(v).astype(jnp.float32) * cotangent))(x)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_jax_relu_exactly(rng, shape, dtype):
    x = random_input(rng, shape, dtype)
    cotangent = jnp.asarray(rng.normal(size=shape), jnp.float32)
    np.testing.assert_array_equal(bit_mask_relu(x), jax.nn.relu(x))
    ours = jax.jit(lambda v: gradient(bit_mask_relu, v, cotangent))(x)
    assert ours.dtype == dtype
    np.testing.assert_array_equal(ours, gradient(jax.nn.relu, x, cotangent))


def test_vmap_of_the_gradient(rng):
    x = random_input(rng, (3, 4, 5, 24))
    cotangent = jnp.asarray(rng.normal(size=(4, 5, 24)), jnp.float32)
    per_row = jax.vmap(lambda v: gradient(bit_mask_relu, v, cotangent))(x)
    np.testing.assert_array_equal(per_row, jax.vmap(lambda v: gradient(jax.nn.relu, v, cotangent))(x))


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_relu(rng, shape):
    torch = pytest.importorskip("torch")
    x = random_input(rng, shape)
    cotangent = rng.normal(size=shape).astype(np.float32)
    x_torch = torch.tensor(np.asarray(x), requires_grad=True)
    y_torch = torch.relu(x_torch)
    y_torch.backward(torch.tensor(cotangent))
    np.testing.assert_array_equal(bit_mask_relu(x), y_torch.detach().numpy())
    np.testing.assert_array_equal(gradient(bit_mask_relu, x, jnp.asarray(cotangent)), x_torch.grad.numpy())


def body_temporaries():
    """MiB of XLA temporaries for a frozen-BN ResNet-50 body's forward and backward on one 256x256 image."""
    model = resnet.ResNet(depth=50)
    image = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))

    def loss(params, stats, images):
        features = model.apply({"params": params, "batch_stats": stats}, images)
        # Linear in the features, so that the loss's own backward needs none of them.
        return sum(jnp.sum(f * jnp.cos(jnp.arange(f.shape[-1], dtype=f.dtype))) for f in features.values())

    compiled = jax.jit(jax.grad(loss)).lower(variables["params"], variables["batch_stats"], image).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def test_frozen_bn_body_keeps_bits_not_conv_outputs(monkeypatch):
    with_bits = body_temporaries()
    assert resnet.relu_after("frozen_bn") is bit_mask_relu
    monkeypatch.setattr(resnet, "relu_after", lambda norm: nn.relu)
    with_floats = body_temporaries()
    # 100.6 against 141.7 MiB with jax 0.10.2's CPU backend.
    assert with_bits < 0.8 * with_floats, (with_bits, with_floats)
