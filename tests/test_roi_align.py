"""RoIAlign: a NumPy reference, torchvision parity (values and gradients), FPN multi-level, jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops.roi_align import flatten_pyramid, fpn_level_for_boxes, multilevel_roi_align, roi_align
from maskrcnn_jax.ops.roi_pool import multilevel_roi_pool
from torch_layout import torch_nchw, torch_rois

F32 = np.float32
# Parity: 1e-5 relative; the atol only covers float32 summation-order noise on outputs near 0.
RTOL, ATOL = 1e-5, 2e-6

# Compiled once per static configuration; eager dispatch of the (2 * sampling_ratio)**2 gathers is slower.
roi_align_jit = jax.jit(roi_align, static_argnums=(2, 3, 4, 5))
multilevel_roi_align_jit = jax.jit(multilevel_roi_align, static_argnums=(2, 3, 4, 5))


def random_boxes(rng, batch, num, height, width, scale):
    """Boxes in input pixels over a (height/scale, width/scale) image: tiny, medium, large, partly outside."""
    image_h, image_w = height / scale, width / scale
    centre = rng.uniform(-0.15, 1.15, (batch, num, 2)) * [image_w, image_h]
    size = np.exp(rng.uniform(np.log(0.3), np.log(1.6 * max(image_h, image_w)), (batch, num, 2)))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=-1)
    boxes[:, 0] = [-5.0, -3.0, 0.6 * image_w, 0.5 * image_h]  # sticks out on the top-left
    boxes[:, 1] = [0.2 * image_w, 0.3 * image_h, 1.3 * image_w, 1.4 * image_h]  # bottom-right
    boxes[:, 2] = [0.4 * image_w, 0.4 * image_h, 0.4 * image_w + 0.2, 0.4 * image_h + 0.1]  # sub-pixel
    return boxes.astype(F32)


def numpy_roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned):
    """Plain-loop RoIAlign (Mask R-CNN with torchvision's conventions), float32 like the C++ kernel."""
    oh, ow = output_size
    batch, height, width, channels = features.shape
    out = np.zeros((batch, boxes.shape[1], oh, ow, channels), F32)
    offset = F32(0.5) if aligned else F32(0.0)
    grid = sampling_ratio

    def bilinear(image, y, x):
        if not (-1.0 <= y <= height and -1.0 <= x <= width):
            return np.zeros(channels, F32)
        y, x = max(y, F32(0)), max(x, F32(0))
        y0, x0 = int(y), int(x)
        if y0 >= height - 1:
            y0 = y1 = height - 1
            y = F32(y0)
        else:
            y1 = y0 + 1
        if x0 >= width - 1:
            x0 = x1 = width - 1
            x = F32(x0)
        else:
            x1 = x0 + 1
        ly, lx = F32(y - y0), F32(x - x0)
        hy, hx = F32(1) - ly, F32(1) - lx
        return (hy * hx) * image[y0, x0] + (hy * lx) * image[y0, x1] + (ly * hx) * image[y1, x0] + (
            ly * lx
        ) * image[y1, x1]

    for b in range(batch):
        for n in range(boxes.shape[1]):
            x1, y1, x2, y2 = [F32(v) * F32(spatial_scale) - offset for v in boxes[b, n]]
            roi_w, roi_h = x2 - x1, y2 - y1
            if not aligned:
                roi_w, roi_h = max(roi_w, F32(1)), max(roi_h, F32(1))
            bin_h, bin_w = F32(roi_h / F32(oh)), F32(roi_w / F32(ow))
            for ph in range(oh):
                for pw in range(ow):
                    total = np.zeros(channels, F32)
                    for iy in range(grid):
                        y = F32(y1 + F32(ph * bin_h)) + F32(F32(iy + 0.5) * bin_h) / F32(grid)
                        for ix in range(grid):
                            x = F32(x1 + F32(pw * bin_w)) + F32(F32(ix + 0.5) * bin_w) / F32(grid)
                            total = total + bilinear(features[b], F32(y), F32(x))
                    out[b, n, ph, pw] = total / F32(grid * grid)
    return out


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 3])
def test_matches_numpy_reference(rng, aligned, sampling_ratio):
    features = rng.standard_normal((2, 9, 12, 3)).astype(F32)
    boxes = random_boxes(rng, 2, 10, 9, 12, 0.25)
    # sampling_ratio 1 runs eagerly (op by op), 3 under jit: both must match.
    fn = roi_align if sampling_ratio == 1 else roi_align_jit
    got = fn(jnp.asarray(features), jnp.asarray(boxes), (4, 3), 0.25, sampling_ratio, aligned)
    want = numpy_roi_align(features, boxes, (4, 3), 0.25, sampling_ratio, aligned)
    assert got.shape == (2, 10, 4, 3, 3)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 4])
def test_matches_torchvision(rng, aligned, sampling_ratio):
    torchvision = pytest.importorskip("torchvision")
    features = rng.standard_normal((2, 13, 17, 8)).astype(F32)
    boxes = random_boxes(rng, 2, 24, 13, 17, 0.125)
    output_size = (5, 3)
    got = roi_align_jit(jnp.asarray(features), jnp.asarray(boxes), output_size, 0.125, sampling_ratio, aligned)
    want = torchvision.ops.roi_align(
        torch_nchw(features), torch_rois(boxes), output_size, 0.125, sampling_ratio, aligned
    )
    want = want.numpy().transpose(0, 2, 3, 1).reshape(2, 24, 5, 3, 8)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("aligned", [False, True])
def test_gradient_matches_torchvision(rng, aligned):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    features = rng.standard_normal((2, 10, 11, 4)).astype(F32)
    boxes = random_boxes(rng, 2, 16, 10, 11, 0.25)
    cotangent = rng.standard_normal((2, 16, 3, 4, 4)).astype(F32)

    def loss(f):
        return jnp.sum(roi_align(f, jnp.asarray(boxes), (3, 4), 0.25, 2, aligned) * cotangent)

    got = jax.jit(jax.grad(loss))(jnp.asarray(features))

    features_t = torch_nchw(features).requires_grad_()
    out = torchvision.ops.roi_align(features_t, torch_rois(boxes), (3, 4), 0.25, 2, aligned)
    out.backward(torch.from_numpy(cotangent.reshape(32, 3, 4, 4).transpose(0, 3, 1, 2).copy()))
    want = features_t.grad.numpy().transpose(0, 2, 3, 1)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=1e-5)


def test_constant_map_and_outside_boxes(rng):
    """Closed forms: a constant map pools to the constant; a box far outside the map pools to 0."""
    value = F32(rng.uniform(0.5, 2.0))
    features = jnp.full((1, 6, 7, 2), value)
    inside = np.array([[[1.0, 1.5, 4.0, 5.0], [0.2, 0.1, 6.8, 5.9]]], F32)
    outside = np.array([[[30.0, 30.0, 40.0, 35.0], [-20.0, -9.0, -4.0, -2.5]]], F32)
    got_inside = roi_align_jit(features, jnp.asarray(inside), 3, 1.0, 2, True)
    got_outside = roi_align_jit(features, jnp.asarray(outside), 3, 1.0, 2, True)
    np.testing.assert_allclose(np.asarray(got_inside), value, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got_outside), 0.0)


def test_batch_equals_per_image_calls_and_outer_vmap(rng):
    features = jnp.asarray(rng.standard_normal((3, 8, 9, 5)).astype(F32))
    boxes = jnp.asarray(random_boxes(rng, 3, 7, 8, 9, 0.5))
    batched = roi_align_jit(features, boxes, (2, 3), 0.5, 2, True)
    for b in range(3):
        single = roi_align_jit(features[b : b + 1], boxes[b : b + 1], (2, 3), 0.5, 2, True)
        np.testing.assert_allclose(np.asarray(batched[b]), np.asarray(single[0]), rtol=1e-6, atol=1e-6)
    # An outer vmap (e.g. over per-device batches) adds a leading axis.
    stacked = jax.jit(jax.vmap(lambda f, b: roi_align(f, b, (2, 3), 0.5, 2, True)))(features[:, None], boxes[:, None])
    np.testing.assert_allclose(np.asarray(stacked[:, 0]), np.asarray(batched), rtol=1e-6, atol=1e-6)


def test_int_output_size_and_bad_sampling_ratio(rng):
    features = jnp.asarray(rng.standard_normal((1, 5, 5, 2)).astype(F32))
    boxes = jnp.asarray([[[0.0, 0.0, 4.0, 4.0]]])
    assert roi_align_jit(features, boxes, 4, 1.0, 1, False).shape == (1, 1, 4, 4, 2)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="sampling_ratio"):
            roi_align(features, boxes, 4, 1.0, bad, False)
    with pytest.raises(ValueError, match="strides"):
        multilevel_roi_align([features, features], boxes, 2, (4, 16), 2, False)


def test_level_assignment_matches_torchvision_level_mapper(rng):
    torch = pytest.importorskip("torch")
    poolers = pytest.importorskip("torchvision.ops.poolers")
    sizes = np.concatenate([rng.uniform(4, 1200, (300, 2)), [[112, 112], [224, 224], [448, 448], [56, 56]]])
    corner = rng.uniform(-50, 500, sizes.shape)
    boxes = np.concatenate([corner, corner + sizes], axis=1).astype(F32)
    got = fpn_level_for_boxes(jnp.asarray(boxes), 2, 5)
    want = poolers.LevelMapper(2, 5)([torch.from_numpy(boxes)]).numpy() + 2
    np.testing.assert_array_equal(np.asarray(got), want)
    assert set(np.asarray(got).tolist()) == {2, 3, 4, 5}
    # Degenerate boxes have no defined level in torchvision; here they go to the finest level.
    degenerate = jnp.asarray([[5.0, 5.0, 5.0, 9.0], [5.0, 5.0, 3.0, 9.0], [np.nan, 0.0, 1.0, 1.0]])
    np.testing.assert_array_equal(np.asarray(fpn_level_for_boxes(degenerate, 2, 5)), 2)


def pyramid(rng, batch, image_hw, strides, channels):
    return [
        rng.standard_normal((batch, image_hw[0] // s, image_hw[1] // s, channels)).astype(F32) for s in strides
    ]


def pyramid_boxes(rng, batch, num, image_hw):
    """Boxes from 8 to ~900 pixels so every FPN level is used, some crossing the image border."""
    centre = rng.uniform(-0.1, 1.1, (batch, num, 2)) * [image_hw[1], image_hw[0]]
    size = np.exp(rng.uniform(np.log(8), np.log(900), (batch, num, 1))) * np.exp(
        rng.uniform(-0.5, 0.5, (batch, num, 2))
    )
    return np.concatenate([centre - size / 2, centre + size / 2], axis=-1).astype(F32)


def test_multilevel_matches_torchvision_multiscale_roi_align(rng):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    image_hw, strides = (128, 192), (4, 8, 16, 32)
    features = pyramid(rng, 2, image_hw, strides, 6)
    boxes = pyramid_boxes(rng, 2, 40, image_hw)
    levels = np.asarray(fpn_level_for_boxes(jnp.asarray(boxes), 2, 5))
    assert set(levels.ravel().tolist()) == {2, 3, 4, 5}

    got = multilevel_roi_align_jit([jnp.asarray(f) for f in features], jnp.asarray(boxes), (7, 5), strides, 2, False)

    pooler = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], (7, 5), 2)
    named = {f"p{k + 2}": torch_nchw(f) for k, f in enumerate(features)}
    want = pooler(named, [torch.from_numpy(b) for b in boxes], [image_hw, image_hw])
    want = want.numpy().transpose(0, 2, 3, 1).reshape(2, 40, 7, 5, 6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


def test_multilevel_aligned_and_gradient_match_per_level_torchvision(rng):
    """aligned=True (MultiScaleRoIAlign has no such switch): torchvision roi_align on each box's own level."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    image_hw, strides = (64, 96), (8, 16, 32)
    features = pyramid(rng, 1, image_hw, strides, 3)
    boxes = pyramid_boxes(rng, 1, 30, image_hw)
    cotangent = rng.standard_normal((1, 30, 4, 4, 3)).astype(F32)

    @jax.jit
    def outputs_and_grads(fs, cot):
        out, vjp = jax.vjp(lambda f: multilevel_roi_align(f, jnp.asarray(boxes), 4, strides, 2, True), fs)
        return out, vjp(cot)[0]

    got_out, got_grads = outputs_and_grads([jnp.asarray(f) for f in features], jnp.asarray(cotangent))

    levels = np.asarray(fpn_level_for_boxes(jnp.asarray(boxes[0]), 3, 5)) - 3
    features_t = [torch_nchw(f).requires_grad_() for f in features]
    want_out = np.zeros((30, 4, 4, 3), F32)
    for k, stride in enumerate(strides):
        picked = np.flatnonzero(levels == k)
        assert picked.size, "every level should get some boxes"
        out = torchvision.ops.roi_align(features_t[k], torch_rois(boxes[:, picked]), 4, 1.0 / stride, 2, True)
        out.backward(torch.from_numpy(cotangent[0, picked].transpose(0, 3, 1, 2).copy()))
        want_out[picked] = out.detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(got_out[0]), want_out, rtol=RTOL, atol=ATOL)
    for got, want in zip(got_grads, features_t):
        np.testing.assert_allclose(np.asarray(got), want.grad.numpy().transpose(0, 2, 3, 1), rtol=RTOL, atol=1e-5)


def test_multilevel_single_level_equals_roi_align(rng):
    features = rng.standard_normal((2, 8, 12, 4)).astype(F32)
    boxes = pyramid_boxes(rng, 2, 9, (64, 96))
    got = multilevel_roi_align_jit([jnp.asarray(features)], jnp.asarray(boxes), 3, (8,), 2, False)
    want = roi_align_jit(jnp.asarray(features), jnp.asarray(boxes), 3, 1.0 / 8, 2, False)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_flat_pyramid_shared_by_two_poolings_equals_the_level_list(rng):
    strides = (4, 8, 16)
    features = [jnp.asarray(rng.standard_normal((2, 64 // s, 96 // s, 3)).astype(F32)) for s in strides]
    boxes = jnp.asarray(pyramid_boxes(rng, 2, 11, (64, 96)))
    pyramid = flatten_pyramid(features, strides)

    def both_sizes(pyramid, boxes, index):
        # Through lax.switch, as the model's mask-head buckets pass it: static level shapes, traced flat array.
        branch = lambda p, b: (multilevel_roi_align(p, b, 3, strides, 2, True), multilevel_roi_pool(p, b, 2, strides))
        return jax.lax.switch(index, [branch, branch], pyramid, boxes)

    aligned, pooled = jax.jit(both_sizes)(pyramid, boxes, 1)
    # Eager against jit: the same sums up to float32 contraction (FMA) rounding.
    np.testing.assert_allclose(aligned, multilevel_roi_align(features, boxes, 3, strides, 2, True), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_array_equal(pooled, multilevel_roi_pool(features, boxes, 2, strides))
    with pytest.raises(ValueError, match="strides"):
        multilevel_roi_align(pyramid, boxes, 3, (8, 16, 32), 2, True)
