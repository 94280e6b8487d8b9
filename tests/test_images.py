"""ops.normalize_canvas: uint8 canvases normalised on the device equal the host's normalisation."""

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax import ops

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def test_normalize_canvas_matches_the_host_and_zeroes_the_padding(rng):
    images = rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    sizes = np.asarray([[20, 24], [13, 7], [1, 24]], np.int32)
    got = np.asarray(jax.jit(ops.normalize_canvas, static_argnums=(2, 3))(images, sizes, MEAN, STD))
    expected = np.zeros(images.shape, np.float32)
    for b, (h, w) in enumerate(sizes):
        expected[b, :h, :w] = (images[b, :h, :w].astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert not got[1, 13:].any() and not got[1, :, 7:].any()


def test_float_canvases_are_already_normalised_and_pass_unchanged(rng):
    images = jnp.asarray(rng.normal(size=(2, 5, 6, 3)), jnp.float32)
    assert ops.normalize_canvas(images, jnp.asarray([[1, 1], [5, 6]]), MEAN, STD) is images
