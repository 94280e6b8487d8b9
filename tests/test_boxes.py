import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import ops


def random_boxes(rng, n, size=100.0, min_wh=0.5):
    xy = rng.uniform(-0.1 * size, size, (n, 2))
    wh = rng.uniform(min_wh, 0.5 * size, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def numpy_iou(a, b):
    out = np.zeros((len(a), len(b)), np.float64)
    for i, p in enumerate(a.astype(np.float64)):
        for j, q in enumerate(b.astype(np.float64)):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def test_box_area_closed_form(rng):
    boxes = random_boxes(rng, 17)
    expected = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    np.testing.assert_allclose(ops.box_area(boxes), expected, rtol=1e-6)


def test_box_iou_matches_numpy_reference(rng):
    a, b = random_boxes(rng, 13), random_boxes(rng, 11)
    np.testing.assert_allclose(ops.box_iou(a, b), numpy_iou(a, b), rtol=1e-5, atol=1e-7)


def test_box_iou_zero_area_pairs_are_zero_not_nan():
    point = np.array([[5.0, 5.0, 5.0, 5.0]], np.float32)
    iou = np.asarray(ops.box_iou(point, point))
    assert np.isfinite(iou).all() and iou[0, 0] == 0.0


def test_box_iou_batched_and_vmap_agree(rng):
    a = np.stack([random_boxes(rng, 7) for _ in range(3)])
    b = np.stack([random_boxes(rng, 5) for _ in range(3)])
    batched = ops.box_iou(a, b)
    mapped = jax.vmap(ops.box_iou)(a, b)
    assert batched.shape == (3, 7, 5)
    np.testing.assert_allclose(batched, mapped, rtol=1e-6)
    for i in range(3):
        np.testing.assert_allclose(batched[i], numpy_iou(a[i], b[i]), rtol=1e-5, atol=1e-7)


def test_box_ioa_is_intersection_over_first_area(rng):
    a, b = random_boxes(rng, 6), random_boxes(rng, 4)
    iou = numpy_iou(a, b)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    # inter = iou * union and union = area_a + area_b - inter, so inter = iou * (area_a + area_b) / (1 + iou).
    inter = iou * (area_a[:, None] + area_b[None]) / (1 + iou)
    np.testing.assert_allclose(ops.box_ioa(a, b), inter / area_a[:, None], rtol=1e-4, atol=1e-6)


def test_encode_decode_round_trip(rng):
    anchors = random_boxes(rng, 50, min_wh=4.0)
    boxes = random_boxes(rng, 50, min_wh=4.0)
    weights = (10.0, 10.0, 5.0, 5.0)
    deltas = ops.encode_boxes(boxes, anchors, weights)
    np.testing.assert_allclose(ops.decode_boxes(deltas, anchors, weights), boxes, rtol=1e-4, atol=1e-3)


def test_decode_clamps_scale():
    anchors = np.array([[0.0, 0.0, 10.0, 20.0]], np.float32)
    deltas = np.array([[0.0, 0.0, 100.0, 100.0]], np.float32)
    decoded = np.asarray(ops.decode_boxes(deltas, anchors))
    scale = 1000.0 / 16
    np.testing.assert_allclose(decoded[0, 2] - decoded[0, 0], 10 * scale, rtol=1e-5)
    np.testing.assert_allclose(decoded[0, 3] - decoded[0, 1], 20 * scale, rtol=1e-5)
    assert np.isfinite(decoded).all()


def test_clip_boxes(rng):
    boxes = random_boxes(rng, 30, size=200.0) - 50
    clipped = np.asarray(ops.clip_boxes(boxes, 90, 120))
    np.testing.assert_array_equal(clipped, np.clip(boxes, 0, [120, 90, 120, 90]))


def test_min_size_mask():
    boxes = np.array([[0, 0, 1, 5], [0, 0, 0.5, 5], [2, 2, 9, 2.9]], np.float32)
    np.testing.assert_array_equal(ops.min_size_mask(boxes, 1.0), [True, False, False])


def test_box_ops_jit_and_grad(rng):
    anchors = random_boxes(rng, 8, min_wh=4.0)
    boxes = random_boxes(rng, 8, min_wh=4.0)
    loss = lambda d: jnp.sum(ops.decode_boxes(d, anchors) ** 2)
    deltas = rng.normal(0, 0.3, (8, 4)).astype(np.float32)
    grad = jax.jit(jax.grad(loss))(deltas)
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0
    iou_grad = jax.grad(lambda b: ops.box_iou(b, anchors).sum())(boxes)
    assert np.isfinite(iou_grad).all()


# --- torchvision parity -------------------------------------------------------------------------------


def test_box_iou_matches_torchvision(rng):
    torch = pytest.importorskip("torch")
    from torchvision.ops import box_iou

    a, b = random_boxes(rng, 200), random_boxes(rng, 150)
    expected = box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(ops.box_iou(a, b), expected, rtol=1e-5, atol=1e-7)


def test_box_coder_matches_torchvision(rng):
    torch = pytest.importorskip("torch")
    from torchvision.models.detection._utils import BoxCoder

    weights = (10.0, 10.0, 5.0, 5.0)
    coder = BoxCoder(weights, bbox_xform_clip=math.log(1000.0 / 16))
    anchors = random_boxes(rng, 300, min_wh=2.0)
    boxes = random_boxes(rng, 300, min_wh=2.0)
    expected = coder.encode_single(torch.from_numpy(boxes), torch.from_numpy(anchors)).numpy()
    np.testing.assert_allclose(ops.encode_boxes(boxes, anchors, weights), expected, rtol=1e-5, atol=1e-5)
    # Large deltas exercise the clamp on dw, dh.
    deltas = rng.normal(0, 30.0, (300, 4)).astype(np.float32)
    expected = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors)).numpy()
    np.testing.assert_allclose(ops.decode_boxes(deltas, anchors, weights), expected, rtol=1e-5, atol=1e-3)


def test_encode_is_finite_for_zero_padded_boxes_and_their_smooth_l1_gradient_too(rng):
    """Zero-padded ground truth (and zero-area padded RoIs) encode to finite targets, so a masked smooth-L1 loss
    has finite gradients: torchvision's encode gives -inf there, and zero cotangent times inf is NaN."""
    anchors = jnp.asarray(random_boxes(rng, 16))
    padding = jnp.zeros((16, 4), jnp.float32)
    for boxes, reference in ((padding, anchors), (anchors, padding), (padding, padding)):
        assert np.isfinite(np.asarray(ops.encode_boxes(boxes, reference, (10.0, 10.0, 5.0, 5.0)))).all()

    positive = jnp.asarray(rng.random(16) < 0.5)
    matched = jnp.where(positive[:, None], jnp.asarray(random_boxes(rng, 16)), 0.0)
    targets = ops.encode_matched_boxes(matched, anchors, positive, (10.0, 10.0, 5.0, 5.0))
    np.testing.assert_array_equal(np.asarray(targets)[~np.asarray(positive)], 0.0)
    np.testing.assert_allclose(targets[positive], ops.encode_boxes(matched, anchors, (10.0, 10.0, 5.0, 5.0))[positive],
                               rtol=1e-6)
    for beta in (0.0, 1.0 / 9):
        grad = jax.grad(lambda p: ops.smooth_l1_loss(p, ops.encode_boxes(padding, anchors), beta, positive))(
            jnp.asarray(rng.normal(size=(16, 4)), jnp.float32))
        assert np.isfinite(np.asarray(grad)).all(), beta
