"""Keypoint targets, loss (ops/keypoints.py) and host-side heatmap decoding (serving/keypoints.py).

torchvision's own functions (torchvision.models.detection.roi_heads) are the references for the torchvision rules.
detectron2 is not installed, so its rules are checked against NumPy references written here from its code
(structures/keypoints.py heatmaps_to_keypoints, modeling/roi_heads/keypoint_head.py keypoint_rcnn_loss):
its targets are torchvision's line for line, its loss is a sum over valid keypoints divided by their number or by
a fixed normaliser, and its decoder differs from torchvision's only in the score.
"""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import keypoints as keypoint_ops
from maskrcnn_jax.ops.keypoints import detectron2_keypoint_loss_normalizer, keypoint_loss, keypoint_targets
from maskrcnn_jax.serving import keypoints as keypoint_decoding
from maskrcnn_jax.serving.keypoints import bicubic_resize_matrix, heatmaps_to_keypoints, resize_bicubic

NUM_KEYPOINTS = 17


def _random_rois(rng, count, min_size=0.5, max_size=300.0):
    """Non-integer boxes with log-uniform sides, small and large."""
    corner = rng.uniform(0, 400, (count, 2))
    size = np.exp(rng.uniform(np.log(min_size), np.log(max_size), (count, 2)))
    return np.concatenate([corner, corner + size], axis=1).astype(np.float32)


def _random_keypoints(rng, rois, num_keypoints=NUM_KEYPOINTS):
    """Keypoints in, around and exactly on the edges of their RoIs, visibility 0, 1 or 2."""
    count = rois.shape[0]
    width, height = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
    x = rois[:, :1] + rng.uniform(-0.3, 1.3, (count, num_keypoints)) * width[:, None]
    y = rois[:, 1:2] + rng.uniform(-0.3, 1.3, (count, num_keypoints)) * height[:, None]
    mid_x, mid_y = (rois[:, 0] + rois[:, 2]) / 2, (rois[:, 1] + rois[:, 3]) / 2
    x[:, 0], x[:, 1], y[:, 2], y[:, 3] = rois[:, 0], rois[:, 2], rois[:, 1], rois[:, 3]  # on an edge ...
    y[:, 0], y[:, 1], x[:, 2], x[:, 3] = mid_y, mid_y, mid_x, mid_x  # ... midway along it
    x[:, 4], y[:, 4] = rois[:, 2], rois[:, 3]  # the bottom-right corner
    visibility = rng.integers(0, 3, (count, num_keypoints))
    return np.stack([x, y, visibility], axis=-1).astype(np.float32)


def _log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _reference_keypoint_loss_sum(logits_nhwc, target_index, valid):
    """Sum over valid keypoints of -log softmax over the m * m positions of their channel (float64)."""
    num_rois, height, width, num_keypoints = logits_nhwc.shape
    per_keypoint = np.asarray(logits_nhwc, np.float64).reshape(num_rois, height * width, num_keypoints)
    log_probs = _log_softmax(np.swapaxes(per_keypoint, 1, 2))  # [R, K, m * m]
    picked = np.take_along_axis(log_probs, np.asarray(target_index)[..., None], axis=-1)[..., 0]
    return -(picked * np.asarray(valid)).sum()


# ----------------------------------------------------------------------------------------------------
# Targets.


@pytest.mark.parametrize("heatmap_size", [56, 7])
def test_targets_match_torchvision(rng, heatmap_size):
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.roi_heads import keypoints_to_heatmap

    rois = _random_rois(rng, 400)
    keypoints = _random_keypoints(rng, rois)
    want_index, want_valid = keypoints_to_heatmap(torch.tensor(keypoints), torch.tensor(rois), heatmap_size)
    # Keypoints midway across a RoI sit on a cell boundary for even m: only torch's own float32 roundings
    # (scale = (1 / width) * m) put them on its side, eagerly and when XLA fuses the arithmetic under jit.
    jitted = jax.jit(keypoint_targets, static_argnames="heatmap_size")
    for target_index, valid in [keypoint_targets(keypoints, rois, heatmap_size),
                                jitted(keypoints, rois, heatmap_size=heatmap_size)]:
        assert target_index.dtype == jnp.int32 and valid.dtype == jnp.bool_
        np.testing.assert_array_equal(np.asarray(valid), want_valid.numpy().astype(bool))
        np.testing.assert_array_equal(np.asarray(target_index), want_index.numpy())
    # Non-trivial: both verdicts occur, and every edge keypoint that is visible is kept.
    assert 0.2 < np.asarray(valid).mean() < 0.8
    np.testing.assert_array_equal(np.asarray(valid)[:, :5], keypoints[:, :5, 2] > 0)


def test_targets_on_the_roi_border_and_visibility():
    """The RoI is the closed box [x1, x2] x [y1, y2]: x1 -> cell 0, x2 -> cell m - 1, a float32 step beyond either
    edge is outside. Visibility 1 (labelled, occluded) counts like 2; 0 never does."""
    m = 56
    roi = np.asarray([[10.25, 20.5, 38.25, 48.5]], np.float32)
    x1, y1, x2, y2 = roi[0]
    mid_x, mid_y = np.float32(24.0), np.float32(34.0)
    points = [
        ((x1, mid_y, 2), True, 27 * m + 0),
        ((x2, mid_y, 2), True, 27 * m + m - 1),
        ((mid_x, y1, 1), True, 0 * m + 27),
        ((mid_x, y2, 1), True, (m - 1) * m + 27),
        ((x2, y2, 2), True, (m - 1) * m + m - 1),
        ((np.nextafter(x1, np.float32(-1)), mid_y, 2), False, 0),
        ((np.nextafter(x2, np.float32(1e9)), mid_y, 2), False, 0),
        ((mid_x, np.nextafter(y2, np.float32(1e9)), 2), False, 0),
        ((mid_x, mid_y, 0), False, 0),
        ((mid_x, mid_y, 1), True, 27 * m + 27),
        ((0.0, 0.0, 0), False, 0),  # a zero-padded keypoint
    ]
    keypoints = np.asarray([[point for point, _, _ in points]], np.float32)
    target_index, valid = keypoint_targets(keypoints, roi, m)
    np.testing.assert_array_equal(np.asarray(valid)[0], [expected for _, expected, _ in points])
    np.testing.assert_array_equal(np.asarray(target_index)[0], [index for _, _, index in points])


def test_targets_of_degenerate_and_padded_rois_are_finite():
    """Zero-width, zero-height, zero-area and zero-padded RoIs. torchvision divides by zero here; its edge rule still
    accepts a keypoint exactly on a zero-length side (x == x1 == x2 -> cell m - 1), and +-inf cells are outside. We
    give those verdicts without ever computing an infinity or NaN: checked op by op under debug_infs/debug_nans."""
    m = 56
    rois = np.asarray([
        [0, 0, 0, 0],  # a padded slot
        [5, 5, 5, 25],  # zero width
        [5, 5, 25, 5],  # zero height
        [5, 5, 5, 5],  # a point
    ], np.float32)
    keypoints = np.zeros((4, 4, 3), np.float32)  # zero-padded keypoints everywhere first
    keypoints[0, 1] = (0, 0, 2)  # a visible keypoint on the padded slot's point
    keypoints[1, 0] = (5, 15, 2)  # on the zero-width RoI's line: x cell m - 1, y cell 28
    keypoints[1, 1] = (6, 15, 2)  # beside it
    keypoints[2, 0] = (15, 5, 1)
    keypoints[2, 1] = (15, 6, 1)
    keypoints[3, 0] = (5, 5, 2)
    keypoints[3, 1] = (5, 6, 2)
    with jax.debug_infs(True), jax.debug_nans(True), jax.disable_jit():
        target_index, valid = keypoint_targets(keypoints, rois, m)
    expected_valid = np.zeros((4, 4), bool)
    expected_valid[[0, 1, 2, 3], [1, 0, 0, 0]] = True
    np.testing.assert_array_equal(np.asarray(valid), expected_valid)
    expected_index = np.zeros((4, 4), np.int32)
    expected_index[0, 1] = m * m - 1
    expected_index[1, 0] = 28 * m + m - 1
    expected_index[2, 0] = (m - 1) * m + 28
    expected_index[3, 0] = m * m - 1
    np.testing.assert_array_equal(np.asarray(target_index), expected_index)


def test_targets_under_jit_and_vmap(rng):
    rois = _random_rois(rng, 3 * 20).reshape(3, 20, 4)
    keypoints = _random_keypoints(rng, rois.reshape(-1, 4)).reshape(3, 20, NUM_KEYPOINTS, 3)
    flat_index, flat_valid = keypoint_targets(keypoints.reshape(-1, NUM_KEYPOINTS, 3), rois.reshape(-1, 4), 56)
    for target_index, valid in [
        jax.jit(keypoint_targets, static_argnames="heatmap_size")(keypoints, rois, heatmap_size=56),
        jax.vmap(lambda k, r: keypoint_targets(k, r, 56))(keypoints, rois),
        jax.jit(jax.vmap(lambda k, r: keypoint_targets(k, r, 56)))(keypoints, rois),
    ]:
        np.testing.assert_array_equal(np.asarray(target_index).reshape(flat_index.shape), flat_index)
        np.testing.assert_array_equal(np.asarray(valid).reshape(flat_valid.shape), flat_valid)


# ----------------------------------------------------------------------------------------------------
# Loss.


def test_loss_and_gradient_match_torchvision(rng):
    """keypointrcnn_loss over two images of different RoI counts (it concatenates them: one mean over the batch)."""
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.roi_heads import keypointrcnn_loss

    m, counts, num_gt = 56, (13, 7), 5
    proposals = [_random_rois(rng, count) for count in counts]
    gt_keypoints = [_random_keypoints(rng, _random_rois(rng, num_gt)) for _ in counts]
    matched = [rng.integers(0, num_gt, count) for count in counts]
    # Matched ground truth near its proposal, so that many keypoints land inside.
    for props, gts, idx in zip(proposals, gt_keypoints, matched):
        gts[idx, :, :2] = _random_keypoints(rng, props)[:, :, :2]
    logits = rng.normal(0, 3, (sum(counts), NUM_KEYPOINTS, m, m)).astype(np.float32)

    torch_logits = torch.tensor(logits, requires_grad=True)
    want = keypointrcnn_loss(torch_logits, [torch.tensor(p) for p in proposals],
                             [torch.tensor(g) for g in gt_keypoints], [torch.tensor(i) for i in matched])
    want.backward()

    keypoints = np.concatenate([g[i] for g, i in zip(gt_keypoints, matched)])
    target_index, valid = keypoint_targets(keypoints, np.concatenate(proposals), m)
    assert 0 < np.asarray(valid).sum() < valid.size
    logits_nhwc = logits.transpose(0, 2, 3, 1)
    value, grad = jax.value_and_grad(lambda x: keypoint_loss(x, target_index, valid, "torchvision"))(logits_nhwc)
    np.testing.assert_allclose(float(value), want.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad).transpose(0, 3, 1, 2), torch_logits.grad.numpy(), atol=1e-7)


def test_loss_detectron2_normalizations(rng):
    """detectron2's keypoint_rcnn_loss: F.cross_entropy(reduction="sum") over valid keypoints, divided by their
    number (NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS=True: the same value as torchvision's mean) or by a fixed
    num_images * K * BATCH_SIZE_PER_IMAGE * POSITIVE_FRACTION."""
    m, num_rois = 14, 30
    logits = rng.normal(0, 2, (num_rois, m, m, NUM_KEYPOINTS)).astype(np.float32)
    target_index = rng.integers(0, m * m, (num_rois, NUM_KEYPOINTS))
    valid = rng.uniform(size=(num_rois, NUM_KEYPOINTS)) < 0.4
    junk_index = np.where(valid, target_index, -7)  # entries that are not valid are never read
    total = _reference_keypoint_loss_sum(logits, target_index, valid)

    by_visible = keypoint_loss(logits, junk_index, valid, "detectron2")
    np.testing.assert_allclose(float(by_visible), total / valid.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(keypoint_loss(logits, junk_index, valid, "torchvision")), float(by_visible),
                               rtol=1e-6)
    fixed = detectron2_keypoint_loss_normalizer(num_images=2, num_keypoints=NUM_KEYPOINTS)
    assert fixed == 2 * NUM_KEYPOINTS * 512 * 0.25
    np.testing.assert_allclose(float(keypoint_loss(logits, junk_index, valid, "detectron2", normalizer=fixed)),
                               total / fixed, rtol=1e-5)
    with pytest.raises(ValueError, match="normalizer"):
        keypoint_loss(logits, target_index, valid, "torchvision", normalizer=fixed)
    with pytest.raises(ValueError, match="normalization"):
        keypoint_loss(logits, target_index, valid, "mean")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("normalization, normalizer", [("torchvision", None), ("detectron2", None),
                                                       ("detectron2", 4352.0)])
def test_loss_without_valid_keypoints_is_zero_with_zero_gradient(rng, dtype, normalization, normalizer):
    """An image with no visible keypoint in any RoI, with padded and degenerate RoIs: loss 0, gradient 0."""
    m = 14
    rois = np.zeros((6, 4), np.float32)
    rois[3:] = [[5, 5, 5, 25], [5, 5, 25, 5], [1, 2, 30, 40]]
    keypoints = _random_keypoints(rng, _random_rois(rng, 6))
    keypoints[..., 2] = 0
    target_index, valid = keypoint_targets(keypoints, rois, m)
    assert not np.asarray(valid).any()
    logits = jnp.asarray(rng.normal(0, 50, (6, m, m, NUM_KEYPOINTS)), dtype)
    value, grad = jax.value_and_grad(
        lambda x: keypoint_loss(x, target_index, valid, normalization, normalizer))(logits)
    assert value.dtype == jnp.float32 and float(value) == 0.0
    assert grad.dtype == dtype
    np.testing.assert_array_equal(np.asarray(grad, np.float32), 0.0)


def test_loss_of_bfloat16_logits_is_float32(rng):
    m = 14
    logits = jnp.asarray(rng.normal(0, 3, (8, m, m, NUM_KEYPOINTS)), jnp.bfloat16)
    target_index = rng.integers(0, m * m, (8, NUM_KEYPOINTS))
    valid = rng.uniform(size=(8, NUM_KEYPOINTS)) < 0.5
    value = keypoint_loss(logits, target_index, valid)
    assert value.dtype == jnp.float32
    want = _reference_keypoint_loss_sum(np.asarray(logits, np.float32), target_index, valid) / valid.sum()
    np.testing.assert_allclose(float(value), want, rtol=1e-5)


def test_loss_gradient_is_finite_everywhere(rng):
    """Extreme logits, junk targets where not valid, degenerate RoIs: the gradient is finite, is
    (softmax - one_hot) / count on valid keypoints' channels and exactly 0 elsewhere."""
    m, num_rois = 14, 5
    rois = np.asarray([[0, 0, 0, 0], [5, 5, 5, 25], [3, 3, 3, 3], [0, 0, 14, 14], [2.5, 1, 9, 30]], np.float32)
    keypoints = _random_keypoints(rng, _random_rois(rng, num_rois, 1, 30))
    keypoints[3, :, :2] = rng.uniform(0, 14, (NUM_KEYPOINTS, 2))
    keypoints[3, :, 2] = 2
    target_index, valid = keypoint_targets(keypoints, rois, m)
    logits = rng.normal(0, 3, (num_rois, m, m, NUM_KEYPOINTS)).astype(np.float32)
    logits[0] = 1e30  # a padded slot full of huge logits
    logits[3, 0, 0, :] = -1e30
    logits[3, 1, 1, :] = 1e4
    for normalization in ("torchvision", "detectron2"):
        grad = jax.grad(lambda x: keypoint_loss(x, target_index, valid, normalization))(logits)
        assert np.isfinite(np.asarray(grad)).all()
    valid = np.asarray(valid)
    per_keypoint = np.swapaxes(logits.astype(np.float64).reshape(num_rois, m * m, NUM_KEYPOINTS), 1, 2)
    expected = np.exp(_log_softmax(per_keypoint))
    np.put_along_axis(expected, np.asarray(target_index)[..., None],
                      np.take_along_axis(expected, np.asarray(target_index)[..., None], -1) - 1, axis=-1)
    expected = expected * valid[..., None] / valid.sum()
    expected = np.swapaxes(expected, 1, 2).reshape(logits.shape)
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-6)
    assert valid[3].all() and not valid[0].any()


def test_loss_under_jit_and_with_batch_axes(rng):
    """Leading [B, R] axes give the batch-level mean of the flattened RoIs, as both peers normalise."""
    m = 14
    logits = rng.normal(0, 2, (2, 6, m, m, NUM_KEYPOINTS)).astype(np.float32)
    target_index = rng.integers(0, m * m, (2, 6, NUM_KEYPOINTS))
    valid = rng.uniform(size=(2, 6, NUM_KEYPOINTS)) < 0.5
    flat = keypoint_loss(logits.reshape(12, m, m, NUM_KEYPOINTS), target_index.reshape(12, -1),
                         valid.reshape(12, -1))
    batched = jax.jit(keypoint_loss, static_argnames="normalization")(logits, target_index, valid,
                                                                       normalization="detectron2")
    np.testing.assert_allclose(float(batched), float(flat), rtol=1e-6)
    per_image = jax.vmap(lambda x, t, v: keypoint_loss(x, t, v, normalizer=1.0))(logits, target_index, valid)
    np.testing.assert_allclose(float(per_image.sum()) / valid.sum(), float(flat), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Decoding.


def _decode_boxes(rng, count):
    """Boxes of many sizes: below a pixel, around the heatmap size, far above it; non-integer, plus degenerate."""
    boxes = _random_rois(rng, count, min_size=0.3, max_size=500)
    boxes[0] = [12.0, 7.0, 12.0, 7.0]  # zero area
    boxes[1] = [3.0, 4.0, 59.0, 60.0]  # exactly 56 x 56
    boxes[2] = [0.0, 0.0, 0.0, 0.0]  # a padded slot
    boxes[3] = [0.5, 1.25, 640.75, 480.5]  # large enough to be resized a few keypoint types at a time
    return boxes


def test_resize_matches_torch_interpolate(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    for in_size, out_size in [(56, 1), (56, 3), (56, 37), (56, 56), (56, 57), (56, 211), (7, 400), (14, 29)]:
        maps = rng.normal(0, 3, (3, in_size, in_size)).astype(np.float32)
        want = F.interpolate(torch.tensor(maps)[:, None], size=(out_size, out_size + 5), mode="bicubic",
                             align_corners=False)[:, 0].numpy()
        got = resize_bicubic(maps, (out_size, out_size + 5))
        # torch resizes in float32: rounding of about 1e-6 of the maps' range, no more.
        np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(maps).max(), rtol=0)
    np.testing.assert_allclose(bicubic_resize_matrix(56, 123).sum(axis=1), 1.0, rtol=1e-12)


def test_decode_matches_torchvision(rng):
    """torchvision's heatmaps_to_keypoints: (x, y) within 1e-3 px and scores within 1e-5.

    We resize in float64, torch in float32; where torch's rounding breaks a near tie between two resized pixels
    differently, the pixel it picked must be a tie in our exact resize too (never seen with these seeds)."""
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.roi_heads import heatmaps_to_keypoints as torchvision_decode

    for heatmap_size in (56, 7):
        boxes = _decode_boxes(rng, 24)
        heatmaps = rng.normal(0, 1, (24, NUM_KEYPOINTS, heatmap_size, heatmap_size)).astype(np.float32)
        want_xy, want_scores = torchvision_decode(torch.tensor(heatmaps), torch.tensor(boxes))
        want_xy, want_scores = want_xy.numpy(), want_scores.numpy()
        got = heatmaps_to_keypoints(heatmaps.transpose(0, 2, 3, 1), boxes, rule="torchvision")
        assert got.shape == (24, NUM_KEYPOINTS, 3) and got.dtype == np.float32
        xy_error = np.abs(got[..., :2] - want_xy[..., :2]).max(axis=-1)
        ties = np.argwhere(xy_error > 1e-3)
        for d, k in ties:
            widths = np.maximum(boxes[d, 2:] - boxes[d, :2], 1)
            out_w, out_h = np.ceil(widths).astype(int)
            resized = resize_bicubic(heatmaps[d, k:k + 1], (out_h, out_w))[0]
            for xy in (want_xy[d, k, :2], got[d, k, :2]):  # both picks are (near) maxima of the exact resize
                x_int, y_int = np.floor((xy - boxes[d, :2]) / (widths / (out_w, out_h))).astype(int)
                assert resized.max() - resized[y_int, x_int] <= 1e-5 * np.abs(heatmaps[d, k]).max()
        assert len(ties) <= 0.01 * xy_error.size
        keep = xy_error <= 1e-3
        np.testing.assert_allclose(got[..., 2][keep], want_scores[keep], atol=1e-5, rtol=0)


def _reference_detectron2_decode(heatmaps_nkhw, boxes):
    """detectron2's heatmaps_to_keypoints, written out in NumPy (float64): a direct 4 x 4-tap bicubic resize per
    output pixel, its full softmax-like score map, and the (x, y, score) columns its inference keeps."""

    def keys_kernel(d):
        d, a = np.abs(d), -0.75
        return np.where(d <= 1, (a + 2) * d**3 - (a + 3) * d**2 + 1,
                        np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0))

    def taps(in_size, out_size):
        source = np.float32(np.float32(in_size) / np.float32(out_size) * (np.arange(out_size) + 0.5) - 0.5)
        base = np.floor(source).astype(int)
        index = base[:, None] + np.arange(-1, 3)
        return np.clip(index, 0, in_size - 1), keys_kernel(source[:, None] - index)

    results = np.zeros(heatmaps_nkhw.shape[:2] + (3,))
    for d, (x1, y1, x2, y2) in enumerate(boxes.astype(np.float32)):
        width, height = max(x2 - x1, np.float32(1)), max(y2 - y1, np.float32(1))
        out_w, out_h = int(np.ceil(width)), int(np.ceil(height))
        maps = heatmaps_nkhw[d].astype(np.float64)
        (row_index, row_weight), (col_index, col_weight) = taps(maps.shape[1], out_h), taps(maps.shape[2], out_w)
        # roi_map[k, i, j] = sum over a, b of row_weight[i, a] * col_weight[j, b] * maps[k, row[i, a], col[j, b]]
        gathered = maps[:, row_index[:, None, :, None], col_index[None, :, None, :]]  # [K, H, W, 4, 4]
        roi_map = (gathered * row_weight[:, None, :, None] * col_weight[None, :, None, :]).sum(axis=(-2, -1))
        max_score = roi_map.reshape(len(maps), -1).max(axis=1)[:, None, None]
        roi_map_scores = np.exp(roi_map - max_score) / np.exp(maps - max_score).sum(axis=(1, 2), keepdims=True)
        position = roi_map.reshape(len(maps), -1).argmax(axis=1)
        x_int, y_int = position % out_w, position // out_w
        results[d, :, 0] = (x_int.astype(np.float32) + np.float32(0.5)) * (width / np.float32(out_w)) + x1
        results[d, :, 1] = (y_int.astype(np.float32) + np.float32(0.5)) * (height / np.float32(out_h)) + y1
        results[d, :, 2] = roi_map_scores[np.arange(len(maps)), y_int, x_int]
    return results


def test_decode_detectron2_matches_numpy_reference(rng):
    """detectron2's decoder: the same (x, y) as torchvision's, its score from the softmax over the m x m map."""
    boxes = _random_rois(rng, 12, min_size=0.3, max_size=90)
    boxes[0] = [4.0, 4.0, 4.0, 4.0]
    heatmaps = rng.normal(0, 2, (12, NUM_KEYPOINTS, 56, 56)).astype(np.float32)
    want = _reference_detectron2_decode(heatmaps, boxes)
    got = heatmaps_to_keypoints(heatmaps.transpose(0, 2, 3, 1), boxes, rule="detectron2")
    np.testing.assert_allclose(got[..., :2], want[..., :2], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[..., 2], want[..., 2], rtol=1e-5)
    assert (got[..., 2] > 0).all()
    same_coordinates = heatmaps_to_keypoints(heatmaps.transpose(0, 2, 3, 1), boxes, rule="torchvision")
    np.testing.assert_array_equal(got[..., :2], same_coordinates[..., :2])


def test_decode_layout_and_half_pixel_offset():
    """A box of exactly m x m pixels resizes by the identity: a peak in row r, column c of channel k decodes to the
    centre of that pixel, (x1 + c + 0.5, y1 + r + 0.5). The heatmaps are NHWC [D, m, m, K]."""
    m, num_keypoints = 56, 3
    box = np.asarray([[10.25, 3.5, 10.25 + m, 3.5 + m]], np.float32)
    heatmaps = np.zeros((1, m, m, num_keypoints), np.float32)
    peaks = [(4, 50), (30, 2), (55, 0)]  # (row, column) per channel
    for k, (row, column) in enumerate(peaks):
        heatmaps[0, row, column, k] = 5.0
    decoded = heatmaps_to_keypoints(heatmaps, box)
    for k, (row, column) in enumerate(peaks):
        np.testing.assert_allclose(decoded[0, k], [10.25 + column + 0.5, 3.5 + row + 0.5, 5.0], rtol=1e-6)


def test_targets_then_decode_round_trip(rng):
    """A keypoint encoded as a one-hot target and decoded from a heatmap peaked there lands within a cell of itself:
    both modules agree on x/y order, the layout and the cell convention."""
    m = 56
    rois = _random_rois(rng, 20, min_size=60, max_size=300)  # cells of at least a pixel
    keypoints = _random_keypoints(rng, rois)
    keypoints[..., 2] = 2
    target_index, valid = keypoint_targets(keypoints, rois, m)
    heatmaps = np.zeros((20, m * m, NUM_KEYPOINTS), np.float32)
    np.put_along_axis(heatmaps, np.asarray(target_index)[:, None, :], 10.0, axis=1)
    decoded = heatmaps_to_keypoints(heatmaps.reshape(20, m, m, NUM_KEYPOINTS), rois)
    cell = (rois[:, 2:] - rois[:, :2]) / m
    error = np.abs(decoded[..., :2] - keypoints[..., :2])
    assert (error[np.asarray(valid)] <= np.broadcast_to(cell[:, None, :], error.shape)[np.asarray(valid)]).all()


def test_decode_empty_and_bad_input():
    assert heatmaps_to_keypoints(np.zeros((0, 56, 56, 17), np.float32), np.zeros((0, 4))).shape == (0, 17, 3)
    decoded = heatmaps_to_keypoints(np.zeros((1, 56, 56, 2), np.float32), np.zeros((1, 4)))
    np.testing.assert_allclose(decoded[0, :, :2], 0.5)  # a padded box decodes as a one-pixel box at the origin
    with pytest.raises(ValueError, match="rule"):
        heatmaps_to_keypoints(np.zeros((1, 56, 56, 2)), np.zeros((1, 4)), rule="caffe2")
    with pytest.raises(ValueError, match="expected heatmaps"):
        heatmaps_to_keypoints(np.zeros((2, 56, 56, 2)), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="finite"):
        heatmaps_to_keypoints(np.zeros((1, 56, 56, 2)), np.full((1, 4), np.nan))


def test_decoding_module_imports_only_numpy():
    """serving/keypoints.py is copied next to exported models: it must not import this package (or JAX)."""
    tree = ast.parse(pathlib.Path(keypoint_decoding.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"numpy", "__future__"}, imported
    assert keypoint_ops.KEYPOINT_LOSS_NORMALIZATIONS == ("torchvision", "detectron2")
