"""layers/norm.group_norm: its written-out backward against autodiff of the textbook normalisation, and forward
and backward against torch.nn.functional.group_norm, float32 on random inputs with a mean far from zero."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from maskrcnn_jax.layers.norm import GroupNorm, group_norm

EPS = 1e-5
# (shape, groups): an NHWC map, few channels per group, RoI features of a head.
CASES = [((2, 9, 11, 64), 32), ((3, 5, 7, 32), 8), ((6, 14, 14, 256), 32)]


def textbook_group_norm(x, weight, bias, num_groups, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias with statistics over (spatial, group's channels), by autodiff."""
    grouped = x.reshape(*x.shape[:-1], num_groups, x.shape[-1] // num_groups)
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = grouped.mean(axes, keepdims=True)
    var = jnp.square(grouped - mean).mean(axes, keepdims=True)
    return ((grouped - mean) * lax.rsqrt(var + eps)).reshape(x.shape) * weight + bias


def random_inputs(rng, shape):
    x = rng.normal(3.0, 2.0, shape).astype(np.float32)  # a mean far from zero tests the centring
    weight = rng.normal(1.0, 0.3, shape[-1]).astype(np.float32)
    bias = rng.normal(0.0, 0.3, shape[-1]).astype(np.float32)
    cotangent = rng.normal(size=shape).astype(np.float32)
    return x, weight, bias, cotangent


def relative_error(expected, actual):
    expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    return np.abs(expected - actual).max() / np.abs(expected).max()


@pytest.mark.parametrize("shape,groups", CASES)
def test_matches_autodiff_of_the_textbook_form(rng, shape, groups):
    x, weight, bias, cotangent = random_inputs(rng, shape)
    ours, ours_pullback = jax.vjp(lambda *a: group_norm(*a, groups, EPS, jnp.float32), x, weight, bias)
    reference, reference_pullback = jax.vjp(lambda *a: textbook_group_norm(*a, groups, EPS), x, weight, bias)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    for name, got, expected in zip(("x", "weight", "bias"), ours_pullback(cotangent), reference_pullback(cotangent)):
        assert got.dtype == jnp.float32 and got.shape == expected.shape, name
        assert relative_error(expected, got) < 1e-5, name


@pytest.mark.parametrize("shape,groups", CASES[:2])
def test_matches_torch_forward_and_backward(rng, shape, groups):
    torch = pytest.importorskip("torch")
    x, weight, bias, cotangent = random_inputs(rng, shape)
    tensors = [torch.tensor(a, requires_grad=True) for a in (x.transpose(0, 3, 1, 2), weight, bias)]
    expected = torch.nn.functional.group_norm(tensors[0], groups, tensors[1], tensors[2], EPS)
    expected.backward(torch.tensor(cotangent.transpose(0, 3, 1, 2)))
    ours, pullback = jax.vjp(lambda *a: group_norm(*a, groups, EPS, jnp.float32), x, weight, bias)
    grad_x, grad_weight, grad_bias = pullback(cotangent)
    np.testing.assert_allclose(ours, expected.detach().numpy().transpose(0, 2, 3, 1), atol=2e-5)
    assert relative_error(tensors[0].grad.numpy().transpose(0, 2, 3, 1), grad_x) < 1e-5
    assert relative_error(tensors[1].grad.numpy(), grad_weight) < 1e-5
    assert relative_error(tensors[2].grad.numpy(), grad_bias) < 1e-5


def test_bfloat16_input_keeps_its_dtype_and_float32_statistics(rng):
    x, weight, bias, cotangent = random_inputs(rng, (2, 8, 8, 64))
    x16 = jnp.asarray(x, jnp.bfloat16)
    out, pullback = jax.vjp(lambda x: group_norm(x, weight, bias, 32, EPS, jnp.bfloat16), x16)
    (grad_x,) = pullback(jnp.asarray(cotangent, jnp.bfloat16))
    assert out.dtype == grad_x.dtype == jnp.bfloat16
    reference, reference_pullback = jax.vjp(lambda x: textbook_group_norm(x, weight, bias, 32, EPS),
                                            x16.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, atol=0.05)
    (expected,) = reference_pullback(jnp.asarray(cotangent, jnp.bfloat16).astype(jnp.float32))
    assert relative_error(expected, grad_x) < 0.02


def test_module_uses_it_under_jit_and_vmap(rng):
    x, _, _, _ = random_inputs(rng, (3, 2, 6, 6, 32))
    module = GroupNorm(num_groups=8)
    variables = module.init(jax.random.key(0), x[0])
    variables = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(size=v.shape), v.dtype), variables)

    def loss(variables, x):
        return jnp.sum(jnp.sin(jax.vmap(lambda image: module.apply(variables, image))(x)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)
    params = variables["params"]

    def reference_loss(params, x):
        return jnp.sum(jnp.sin(jax.vmap(lambda image: textbook_group_norm(image, params["weight"], params["bias"],
                                                                          8, EPS))(x)))

    expected = jax.grad(reference_loss, argnums=(0, 1))(params, x)
    assert relative_error(expected[1], grads[1]) < 1e-5
    for name in ("weight", "bias"):
        assert relative_error(expected[0][name], grads[0]["params"][name]) < 1e-5
