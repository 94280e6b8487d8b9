"""RoIPool: a NumPy reference, torchvision parity (values, argmax gradients, ties), multi-level, jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops.roi_align import fpn_level_for_boxes
from maskrcnn_jax.ops.roi_pool import multilevel_roi_pool, roi_pool
from torch_layout import torch_nchw, torch_rois

F32 = np.float32
roi_pool_jit = jax.jit(roi_pool, static_argnums=(2, 3))


def random_boxes(rng, batch, num, height, width, scale):
    """Tiny, large and partly-outside boxes, plus corners that land exactly on .5 after scaling."""
    image_h, image_w = height / scale, width / scale
    centre = rng.uniform(-0.2, 1.2, (batch, num, 2)) * [image_w, image_h]
    size = np.exp(rng.uniform(np.log(0.3), np.log(1.5 * max(image_h, image_w)), (batch, num, 2)))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=-1)
    half = 0.5 / scale
    boxes[:, 0] = [1 * half, 3 * half, 9 * half, 7 * half]  # x1 * scale = 0.5, 1.5, ...: C round() goes up
    boxes[:, 1] = [-3 * half, -1 * half, 5 * half, 3 * half]  # -1.5, -0.5: away from zero
    boxes[:, 2] = [30 * half, 6 * half, 2 * half, 2 * half]  # x2 < x1: forced to one cell
    return boxes.astype(F32)


def numpy_roi_pool(features, boxes, output_size, spatial_scale):
    """Plain-loop Fast R-CNN RoIPool with torchvision's rounding and bin rules."""
    oh, ow = output_size
    batch, height, width, channels = features.shape
    out = np.zeros((batch, boxes.shape[1], oh, ow, channels), F32)

    def c_round(v):
        return int(np.sign(v) * np.floor(abs(v) + 0.5)) if abs(v - np.trunc(v)) == 0.5 else int(np.round(v))

    for b in range(batch):
        for n in range(boxes.shape[1]):
            x1, y1, x2, y2 = [c_round(F32(v) * F32(spatial_scale)) for v in boxes[b, n]]
            roi_w, roi_h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
            bin_h, bin_w = F32(roi_h) / F32(oh), F32(roi_w) / F32(ow)
            for ph in range(oh):
                h0 = min(max(int(np.floor(F32(ph) * bin_h)) + y1, 0), height)
                h1 = min(max(int(np.ceil(F32(ph + 1) * bin_h)) + y1, 0), height)
                for pw in range(ow):
                    w0 = min(max(int(np.floor(F32(pw) * bin_w)) + x1, 0), width)
                    w1 = min(max(int(np.ceil(F32(pw + 1) * bin_w)) + x1, 0), width)
                    if h1 > h0 and w1 > w0:
                        out[b, n, ph, pw] = features[b, h0:h1, w0:w1].max(axis=(0, 1))
    return out


def test_matches_numpy_reference(rng):
    features = rng.standard_normal((2, 11, 14, 3)).astype(F32)
    boxes = random_boxes(rng, 2, 16, 11, 14, 0.25)
    got = roi_pool_jit(jnp.asarray(features), jnp.asarray(boxes), (4, 3), 0.25)
    want = numpy_roi_pool(features, boxes, (4, 3), 0.25)
    assert (want == 0).mean() < 0.5, "most bins should be non-empty"
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("integer_valued", [False, True])
def test_values_and_gradient_match_torchvision(rng, integer_valued):
    """Exact values; gradients to torchvision's argmax, also when many cells tie (integer-valued features)."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    features = rng.standard_normal((2, 13, 17, 6)).astype(F32)
    if integer_valued:
        features = np.round(features).astype(F32)
    boxes = random_boxes(rng, 2, 20, 13, 17, 0.125)
    cotangent = rng.standard_normal((2, 20, 5, 3, 6)).astype(F32)

    @jax.jit
    def values_and_grad(f):
        out, vjp = jax.vjp(lambda x: roi_pool(x, jnp.asarray(boxes), (5, 3), 0.125), f)
        return out, vjp(jnp.asarray(cotangent))[0]

    got, got_grad = values_and_grad(jnp.asarray(features))

    features_t = torch_nchw(features).requires_grad_()
    want = torchvision.ops.roi_pool(features_t, torch_rois(boxes), (5, 3), 0.125)
    want.backward(torch.from_numpy(cotangent.reshape(40, 5, 3, 6).transpose(0, 3, 1, 2).copy()))
    want = want.detach().numpy().transpose(0, 2, 3, 1).reshape(2, 20, 5, 3, 6)
    np.testing.assert_array_equal(np.asarray(got), want)
    want_grad = features_t.grad.numpy().transpose(0, 2, 3, 1)
    assert np.abs(want_grad).max() > 0.1
    np.testing.assert_allclose(np.asarray(got_grad), want_grad, rtol=1e-5, atol=1e-6)


def test_empty_bins_are_zero_and_get_no_gradient(rng):
    features = jnp.asarray(rng.standard_normal((1, 6, 6, 2)).astype(F32))
    boxes = jnp.asarray([[[40.0, 40.0, 60.0, 60.0], [-30.0, -20.0, -8.0, -6.0]]])
    out, grad = jax.jit(jax.value_and_grad(lambda f: jnp.sum(roi_pool(f, boxes, 2, 1.0))))(features)
    assert float(out) == 0.0
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_batch_equals_per_image_calls_and_outer_vmap(rng):
    features = jnp.asarray(rng.standard_normal((3, 7, 9, 4)).astype(F32))
    boxes = jnp.asarray(random_boxes(rng, 3, 6, 7, 9, 0.5))
    batched = roi_pool_jit(features, boxes, (3, 2), 0.5)
    for b in range(3):
        single = roi_pool_jit(features[b : b + 1], boxes[b : b + 1], (3, 2), 0.5)
        np.testing.assert_array_equal(np.asarray(batched[b]), np.asarray(single[0]))
    stacked = jax.jit(jax.vmap(lambda f, b: roi_pool(f, b, (3, 2), 0.5)))(features[:, None], boxes[:, None])
    np.testing.assert_array_equal(np.asarray(stacked[:, 0]), np.asarray(batched))


def test_multilevel_equals_torchvision_roi_pool_on_each_boxs_level(rng):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    image_hw, strides = (64, 96), (8, 16, 32)
    features = [rng.standard_normal((1, 64 // s, 96 // s, 3)).astype(F32) for s in strides]
    centre = rng.uniform(-0.1, 1.1, (1, 30, 2)) * [96, 64]
    size = np.exp(rng.uniform(np.log(8), np.log(900), (1, 30, 1))) * np.exp(rng.uniform(-0.5, 0.5, (1, 30, 2)))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=-1).astype(F32)
    cotangent = rng.standard_normal((1, 30, 3, 3, 3)).astype(F32)

    @jax.jit
    def values_and_grads(fs):
        out, vjp = jax.vjp(lambda x: multilevel_roi_pool(x, jnp.asarray(boxes), 3, strides), fs)
        return out, vjp(jnp.asarray(cotangent))[0]

    got, got_grads = values_and_grads([jnp.asarray(f) for f in features])

    levels = np.asarray(fpn_level_for_boxes(jnp.asarray(boxes[0]), 3, 5)) - 3
    features_t = [torch_nchw(f).requires_grad_() for f in features]
    want = np.zeros((30, 3, 3, 3), F32)
    for k, stride in enumerate(strides):
        picked = np.flatnonzero(levels == k)
        assert picked.size, "every level should get some boxes"
        out = torchvision.ops.roi_pool(features_t[k], torch_rois(boxes[:, picked]), 3, 1.0 / stride)
        out.backward(torch.from_numpy(cotangent[0, picked].transpose(0, 3, 1, 2).copy()))
        want[picked] = out.detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(got[0]), want)
    for got_grad, want_t in zip(got_grads, features_t):
        np.testing.assert_allclose(
            np.asarray(got_grad), want_t.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6
        )
