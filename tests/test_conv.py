"""layers/conv.py against lax.conv_general_dilated and its autodiff: forward, both gradients, flax's nn.Conv."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export, lax

from maskrcnn_jax.layers import conv

# (input [B, H, W, C], kernel [kh, kw, in, out], strides, padding): 1x1, 3x3, the 7x7 stem, strides that do and do
# not divide the input, asymmetric and cropping (negative) padding, a rectangular kernel and stride, 'SAME'.
CASES = [
    ((2, 9, 11, 5), (1, 1, 5, 7), (1, 1), ((0, 0), (0, 0))),
    ((2, 9, 11, 5), (1, 1, 5, 7), (2, 2), ((0, 0), (0, 0))),
    ((1, 10, 7, 4), (1, 1, 4, 3), (2, 3), ((1, 0), (0, 2))),
    ((2, 9, 11, 5), (3, 3, 5, 6), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 11, 5), (3, 3, 5, 6), (2, 2), ((1, 1), (1, 1))),
    ((1, 16, 12, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),
    ((1, 8, 9, 4), (3, 2, 4, 5), (2, 1), ((0, 2), (1, -1))),
    ((1, 8, 9, 4), (3, 3, 4, 5), (3, 2), "SAME"),
]
IDS = ["1x1", "1x1-s2", "1x1-s2x3-pad", "3x3", "3x3-s2", "7x7-s2", "3x2-asym", "3x3-s3x2-same"]


def reference_conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=conv.NHWC)


def fast_conv(x, kernel, strides, padding):
    return conv.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=conv.NHWC)


def branch_conv(x, kernel, strides, padding):
    return conv.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=conv.NHWC,
                                     in_conditional_branch=True)


def gradients(conv_fn, x, kernel, cotangent, strides, padding):
    """(input gradient, kernel gradient) of <conv(x, kernel), cotangent>, jitted."""

    def pairing(x, kernel):
        out = conv_fn(x, kernel, strides, padding)
        return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32))

    return jax.jit(jax.grad(pairing, argnums=(0, 1)))(x, kernel)


def random_problem(rng, x_shape, kernel_shape, strides, padding, dtype=jnp.float32):
    x = jnp.asarray(rng.standard_normal(x_shape), dtype)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape), dtype)
    out_shape = reference_conv(x, kernel, strides, padding).shape
    cotangent = jnp.asarray(rng.standard_normal(out_shape), dtype)
    return x, kernel, cotangent


@pytest.fixture(params=["top-level", "in-conditional-branch"])
def conv_fn(request):
    """Both CPU formulations of a k x k kernel gradient: XLA's transpose (top level) and one matmul per tap."""
    return {"top-level": fast_conv, "in-conditional-branch": branch_conv}[request.param]


@pytest.mark.parametrize("x_shape, kernel_shape, strides, padding", CASES, ids=IDS)
def test_forward_and_gradients_match_lax(rng, conv_fn, x_shape, kernel_shape, strides, padding):
    x, kernel, cotangent = random_problem(rng, x_shape, kernel_shape, strides, padding)
    np.testing.assert_allclose(
        jax.jit(conv_fn, static_argnums=(2, 3))(x, kernel, strides, padding),
        reference_conv(x, kernel, strides, padding),
        rtol=1e-6,
        atol=1e-5,
    )
    expected = gradients(reference_conv, x, kernel, cotangent, strides, padding)
    got = gradients(conv_fn, x, kernel, cotangent, strides, padding)
    for name, e, g in zip(("input", "kernel"), expected, got):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("case", [1, 4], ids=["1x1-s2", "3x3-s2"])
def test_bfloat16_gradients_within_rounding(rng, conv_fn, case):
    x_shape, kernel_shape, strides, padding = CASES[case]
    x, kernel, cotangent = random_problem(rng, x_shape, kernel_shape, strides, padding, jnp.bfloat16)
    got = gradients(conv_fn, x, kernel, cotangent, strides, padding)
    # The float32 gradients of the same bfloat16-rounded numbers.
    exact = gradients(reference_conv, *(a.astype(jnp.float32) for a in (x, kernel, cotangent)), strides, padding)
    for name, g, e in zip(("input", "kernel"), got, exact):
        assert g.dtype == jnp.bfloat16, name
        scale = float(jnp.max(jnp.abs(e)))
        np.testing.assert_allclose(np.asarray(g, np.float32), e, atol=2e-2 * scale, err_msg=name)


def test_vmap_over_kernels_and_inputs(rng, conv_fn):
    x = jnp.asarray(rng.standard_normal((3, 2, 9, 9, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 4, 5)), jnp.float32)

    def per_example_grads(conv_fn):
        pairing = lambda x, kernel: jnp.sum(jnp.sin(conv_fn(x, kernel, (2, 2), ((1, 1), (1, 1)))))  # noqa: E731
        return jax.jit(jax.vmap(jax.grad(pairing, argnums=(0, 1))))(x, kernel)

    for e, g in zip(per_example_grads(reference_conv), per_example_grads(conv_fn)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4)


def test_unsupported_arguments_fall_back_to_lax(rng):
    # Feature groups and kernel dilation are not on the fast path; they must still give lax's results.
    x = jnp.asarray(rng.standard_normal((1, 9, 9, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 2, 6)), jnp.float32)
    options = dict(padding=((2, 2), (2, 2)), rhs_dilation=(2, 2), dimension_numbers=conv.NHWC, feature_group_count=2)

    def pairing(conv_fn):
        return jax.grad(lambda x, kernel: jnp.sum(jnp.sin(conv_fn(x, kernel, (1, 1), **options))), argnums=(0, 1))

    for e, g in zip(pairing(lax.conv_general_dilated)(x, kernel), pairing(conv.conv_general_dilated)(x, kernel)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_one_compile_for_new_values(rng):
    x_shape, kernel_shape, strides, padding = CASES[4]
    step = jax.jit(jax.grad(lambda x, kernel: jnp.sum(fast_conv(x, kernel, strides, padding) ** 2), argnums=(0, 1)))
    for _ in range(3):
        x, kernel, _ = random_problem(rng, x_shape, kernel_shape, strides, padding)
        expected = jax.grad(lambda x, kernel: jnp.sum(reference_conv(x, kernel, strides, padding) ** 2), argnums=(0, 1))
        for e, g in zip(expected(x, kernel), step(x, kernel)):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4)
    assert step._cache_size() == 1


def test_flax_conv_keeps_parameters_and_numerics(rng):
    """layers.conv.Conv, the convolution every module of modeling/ uses, is flax's nn.Conv with the CPU backward."""
    common = dict(features=6, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    plain = nn.Conv(**common)
    fast = conv.Conv(**common)
    assert fast.conv_general_dilated is conv.conv_general_dilated
    x = jnp.asarray(rng.standard_normal((2, 9, 11, 5)), jnp.float32)
    params = plain.init(jax.random.key(0), x)
    fast_params = fast.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, fast_params) == {"params": {"kernel": (3, 3, 5, 6), "bias": (6,)}}
    jax.tree.map(np.testing.assert_array_equal, fast_params, params)
    params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)

    def loss(module):
        return jax.jit(jax.value_and_grad(lambda params: jnp.sum(jnp.tanh(module.apply(params, x)))))

    (expected_loss, expected_grads), (got_loss, got_grads) = loss(plain)(params), loss(fast)(params)
    np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-6)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5), got_grads, expected_grads)


def test_accelerators_keep_xla_convolution_backward():
    # Exported for CUDA, the backward is XLA's two convolutions; for CPU, the 1x1 kernel's two matmuls.
    def input_and_kernel_grads(x, kernel):
        return jax.grad(lambda x, kernel: jnp.sum(fast_conv(x, kernel, (2, 2), ((0, 0), (0, 0)))), argnums=(0, 1))(
            x, kernel
        )

    shapes = (jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32), jax.ShapeDtypeStruct((1, 1, 4, 6), jnp.float32))
    counts = {}
    for platform in ("cuda", "cpu"):
        text = export.export(jax.jit(input_and_kernel_grads), platforms=(platform,))(*shapes).mlir_module()
        counts[platform] = (text.count("stablehlo.convolution"), text.count("stablehlo.dot_general"))
    assert counts == {"cuda": (2, 0), "cpu": (0, 2)}


def test_gradients_in_a_switch_branch_match_lax_and_use_only_forward_convolutions(rng):
    # Inside a lax.cond/switch branch XLA's CPU backend runs its own weight-gradient convolutions some 500x slower
    # than at the top level; there the CPU backward must consist of forward-layout convolutions and matmuls only.
    x, kernel, cotangent = random_problem(rng, (3, 9, 11, 5), (3, 3, 5, 6), (2, 2), ((1, 1), (1, 1)))

    def branch_grads(conv_fn):
        def pairing(x, kernel):
            out = conv_fn(x, kernel, (2, 2), ((1, 1), (1, 1)))
            return jnp.sum(out * cotangent)

        def grads(x, kernel, index):
            return lax.switch(index, [jax.grad(pairing, argnums=(0, 1)), lambda x, k: (x * 0, k * 0)], x, kernel)

        return jax.jit(grads)

    expected = branch_grads(reference_conv)(x, kernel, 0)
    for conv_fn, layouts in ((branch_conv, {"b01f_01io->b01f"}), (fast_conv, {"b01f_01io->b01f", "f01b_i01o->01bf"})):
        fast = branch_grads(conv_fn)
        for e, g in zip(expected, fast(x, kernel, 0)):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4)
        hlo = fast.lower(x, kernel, 0).compile().as_text()
        # The top-level variant's weight gradient is XLA's own: the layout this test keeps out of branches.
        assert set(re.findall(r"convolution\(.*?dim_labels=(\S+?),", hlo)) == layouts, conv_fn.__name__
