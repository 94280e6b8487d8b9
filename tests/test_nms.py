"""nms / batched_nms against a plain greedy loop and against torchvision.ops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops.nms import batched_nms, nms


@functools.cache
def _jitted(function, iou_threshold, max_output):
    """One compiled function per (op, threshold, max_output); shapes are reused across tests so jit caches hit."""
    return jax.jit(functools.partial(function, iou_threshold=iou_threshold, max_output=max_output))


def _kept(indices, valid):
    indices, valid = np.asarray(indices), np.asarray(valid)
    # Valid slots come first and unused slots hold index 0.
    count = int(valid.sum())
    assert valid[:count].all() and not valid[count:].any()
    assert (indices[count:] == 0).all()
    return indices[:count]


def greedy_nms_reference(boxes, scores, iou_threshold, valid=None, classes=None):
    """Plain greedy NMS like torchvision's CPU kernel: float32 IoU (same formula), compared in float64.

    Each kept box suppresses the remaining ones in one vectorized NumPy step; NumPy never fuses multiply-adds,
    so every IoU is rounded exactly as in the C++ loop.
    """
    boxes = np.asarray(boxes, np.float32)
    valid = np.ones(len(boxes), bool) if valid is None else np.asarray(valid)
    classes = np.zeros(len(boxes), np.int64) if classes is None else np.asarray(classes)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-np.asarray(scores, np.float32), kind="stable")
    order = order[valid[order]]
    suppressed = np.zeros(len(boxes), bool)
    kept = []
    for rank, i in enumerate(order):
        if suppressed[i]:
            continue
        kept.append(i)
        later = order[rank + 1 :]
        right = np.minimum(boxes[i, 2], boxes[later, 2])
        bottom = np.minimum(boxes[i, 3], boxes[later, 3])
        width = np.maximum(np.float32(0), right - np.maximum(boxes[i, 0], boxes[later, 0]))
        height = np.maximum(np.float32(0), bottom - np.maximum(boxes[i, 1], boxes[later, 1]))
        intersection = width * height
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = intersection / (areas[i] + areas[later] - intersection)
        suppressed[later[(iou.astype(np.float64) > iou_threshold) & (classes[later] == classes[i])]] = True
    return np.array(kept, np.int64)


def _float32_iou(box_a, box_b):
    """torchvision's float32 IoU of two boxes, op by op."""
    width = max(np.float32(0), min(box_a[2], box_b[2]) - max(box_a[0], box_b[0]))
    height = max(np.float32(0), min(box_a[3], box_b[3]) - max(box_a[1], box_b[1]))
    intersection = width * height
    area_a = (box_a[2] - box_a[0]) * (box_a[3] - box_a[1])
    area_b = (box_b[2] - box_b[0]) * (box_b[3] - box_b[1])
    return intersection / (area_a + area_b - intersection)


def clustered_boxes(rng, num_boxes, num_clusters, image_size=(800, 1344), jitter=0.15):
    """Boxes jittered around `num_clusters` objects: few clusters give heavy overlap."""
    height, width = image_size
    centers = rng.uniform(0, 1, (num_clusters, 2)) * [width, height]
    sizes = np.exp(rng.uniform(np.log(16), np.log(400), (num_clusters, 2)))
    cluster = rng.integers(0, num_clusters, num_boxes)
    box_centers = centers[cluster] + rng.normal(0, jitter, (num_boxes, 2)) * sizes[cluster]
    box_sizes = sizes[cluster] * np.exp(rng.normal(0, 0.15, (num_boxes, 2)))
    boxes = np.concatenate([box_centers - box_sizes / 2, box_centers + box_sizes / 2], axis=1)
    return boxes.astype(np.float32), rng.random(num_boxes).astype(np.float32)


def scattered_boxes(rng, num_boxes, image_size=(800, 1344)):
    """RPN-like proposals spread over the image at many scales: light overlap, most boxes survive."""
    height, width = image_size
    centers = rng.uniform(0, 1, (num_boxes, 2)) * [width, height]
    scale = np.exp(rng.uniform(np.log(16), np.log(512), num_boxes))
    aspect = np.exp(rng.uniform(-0.7, 0.7, num_boxes))
    half = np.stack([scale * aspect, scale / aspect], axis=1) / 2
    boxes = np.clip(np.concatenate([centers - half, centers + half], axis=1), 0, [width, height, width, height])
    return boxes.astype(np.float32), rng.random(num_boxes).astype(np.float32)


def test_matches_reference_with_truncation_and_padding(rng):
    nms_fn = _jitted(nms, 0.5, 16)
    for _ in range(4):
        boxes, scores = clustered_boxes(rng, 40, num_clusters=int(rng.integers(3, 12)), image_size=(64, 64))
        valid = rng.random(40) < 0.8
        expected = greedy_nms_reference(boxes, scores, 0.5, valid)
        kept = _kept(*nms_fn(boxes, scores, valid=valid))
        np.testing.assert_array_equal(kept, expected[:16])
        assert not np.isin(kept, np.flatnonzero(~valid)).any()
        # No padding: the same boxes, all valid.
        expected = greedy_nms_reference(boxes, scores, 0.5)
        np.testing.assert_array_equal(_kept(*nms_fn(boxes, scores, valid=np.ones(40, bool))), expected[:16])


def test_padded_boxes_neither_kept_nor_suppressing(rng):
    """Padding that would suppress everything (a huge box with the top score) is ignored when marked invalid."""
    boxes, scores = clustered_boxes(rng, 40, num_clusters=6, image_size=(64, 64))
    boxes[:5] = [0, 0, 64, 64]
    scores[:5] = 2.0
    valid = np.arange(40) >= 5
    kept = _kept(*_jitted(nms, 0.5, 16)(boxes, scores, valid=valid))
    np.testing.assert_array_equal(kept, 5 + greedy_nms_reference(boxes[5:], scores[5:], 0.5)[:16])


def test_threshold_is_compared_like_torchvision():
    """torchvision compares the float32 IoU with a float64 threshold. float32(0.3) > 0.3, so an IoU equal to
    float32(0.3) suppresses at threshold 0.3; float32(0.7) < 0.7, so an IoU equal to float32(0.7) does not."""
    for height, threshold, expected in ((3, 0.3, [0]), (7, 0.7, [0, 1])):
        # A box nested in a 1 x 10 box: IoU = float32(height / 10) = float32(threshold) exactly.
        boxes = np.array([[0, 0, 1, 10], [0, 0, 1, height]], np.float32)
        scores = np.array([0.9, 0.8], np.float32)
        np.testing.assert_array_equal(greedy_nms_reference(boxes, scores, threshold), expected)
        np.testing.assert_array_equal(_kept(*_jitted(nms, threshold, 2)(boxes, scores)), expected)


def test_iou_is_rounded_like_torchvision(rng):
    """Each pair's threshold is its own float32 IoU as torchvision rounds it (so the second box survives), or one
    float32 step below (so it is suppressed). An IoU off by one rounding step, e.g. from a fused multiply-add,
    flips one of the two."""
    num_pairs = 2000
    first, _ = clustered_boxes(rng, num_pairs, num_clusters=num_pairs, jitter=0.0)
    size = np.tile(first[:, 2:] - first[:, :2], 2)
    second = (first + rng.normal(0, 0.15, (num_pairs, 4)) * size).astype(np.float32)
    # Keep clear of IoU 0, whose float32 step below is a denormal that XLA's CPU flushes to zero.
    apart = np.array([_float32_iou(a, b) <= 0.01 for a, b in zip(first, second)])
    assert apart.mean() < 0.05
    second[apart] = first[apart] + 1
    iou = np.array([_float32_iou(a, b) for a, b in zip(first, second)], np.float32)
    boxes = np.stack([first, second], axis=1)
    scores = np.tile(np.array([0.9, 0.8], np.float32), (num_pairs, 1))
    pairwise_nms = jax.jit(jax.vmap(lambda b, s, t: nms(b, s, t, 2)))
    _, at_iou = pairwise_nms(boxes, scores, iou)
    _, below_iou = pairwise_nms(boxes, scores, np.nextafter(iou, np.float32(-np.inf)))
    assert np.asarray(at_iou).all()
    assert not np.asarray(below_iou)[:, 1].any()


def test_identical_boxes_keep_only_the_best(rng):
    top_left = rng.uniform(0, 50, 2)
    box = np.concatenate([top_left, top_left + rng.uniform(1, 50, 2)])
    boxes = np.tile(box.astype(np.float32), (300, 1))
    scores = rng.random(300).astype(np.float32)
    kept = _kept(*_jitted(nms, 0.5, 64)(boxes, scores, valid=np.ones(300, bool)))
    np.testing.assert_array_equal(kept, [np.argmax(scores)])


def test_zero_area_boxes_never_suppress(rng):
    """0 / 0 IoU is NaN, never above the threshold: empty boxes (even identical ones) all survive."""
    boxes, scores = clustered_boxes(rng, 300, num_clusters=10, image_size=(64, 64))
    empty = rng.random(300) < 0.3
    boxes[empty, 2] = boxes[empty, 0]
    boxes[empty[::-1], 3] = boxes[empty[::-1], 1]
    boxes[:4] = np.tile(boxes[0, :2], 2)  # four identical points with the top scores
    scores[:4] = [1.4, 1.3, 1.2, 1.1]
    kept = _kept(*_jitted(nms, 0.5, 64)(boxes, scores, valid=np.ones(300, bool)))
    np.testing.assert_array_equal(kept, greedy_nms_reference(boxes, scores, 0.5)[:64])
    np.testing.assert_array_equal(kept[:4], [0, 1, 2, 3])


def test_torchvision_parity_heavy_overlap(rng):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    boxes, scores = clustered_boxes(rng, 6000, num_clusters=60)
    expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
    assert 60 <= len(expected) < 1000  # heavy overlap: few survivors, none truncated
    np.testing.assert_array_equal(_kept(*_jitted(nms, 0.5, 1000)(boxes, scores)), expected)


def test_torchvision_parity_light_overlap(rng):
    """The RPN regime: threshold 0.7, most boxes survive, the output is truncated."""
    iou_threshold = 0.7
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    boxes, scores = scattered_boxes(rng, 6000)
    expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou_threshold).numpy()
    assert len(expected) > 1000  # light overlap: the output is truncated
    np.testing.assert_array_equal(_kept(*_jitted(nms, iou_threshold, 1000)(boxes, scores)), expected[:1000])


def test_torchvision_parity_score_ties_and_nan(rng):
    """Equal scores (also 0.0 and -0.0) keep index order as in torchvision's stable sort; NaN scores go first."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    boxes, _ = clustered_boxes(rng, 6000, num_clusters=200)
    scores = rng.integers(0, 20, 6000).astype(np.float32) / 4 - 2
    scores[rng.random(6000) < 0.05] = 0.0
    scores[rng.random(6000) < 0.05] = -0.0
    scores[rng.random(6000) < 0.01] = np.nan
    expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
    np.testing.assert_array_equal(_kept(*_jitted(nms, 0.5, 1000)(boxes, scores)), expected[:1000])


def test_torchvision_parity_many_boxes(rng):
    """Past 65,536 boxes a position no longer fits in 16 bits, and the ranking sort takes another path."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    boxes, scores = clustered_boxes(rng, 70000, num_clusters=100)
    scores[rng.random(70000) < 0.3] = 0.5  # ties
    expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
    np.testing.assert_array_equal(_kept(*_jitted(nms, 0.5, 64)(boxes, scores)), expected[:64])


def test_batched_nms_matches_torchvision(rng):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    boxes, scores = clustered_boxes(rng, 2000, num_clusters=40)
    classes = rng.integers(0, 6, 2000).astype(np.int32)
    expected = torchvision.ops.batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes).long(), 0.5
    ).numpy()
    kept = _kept(*_jitted(batched_nms, 0.5, 1000)(boxes, scores, classes))
    np.testing.assert_array_equal(kept, expected)


def test_batched_nms_matches_reference_with_padding(rng):
    boxes, scores = clustered_boxes(rng, 40, num_clusters=5, image_size=(64, 64))
    classes = rng.integers(0, 3, 40)
    valid = rng.random(40) < 0.8
    expected = greedy_nms_reference(boxes, scores, 0.5, valid, classes)
    kept = _kept(*_jitted(batched_nms, 0.5, 16)(boxes, scores, classes, valid=valid))
    np.testing.assert_array_equal(kept, expected[:16])


def test_vmap_matches_per_image_calls(rng):
    """A batch of 3 images, 300 boxes each (not a multiple of the block size), each with its own padding."""
    images = [clustered_boxes(rng, 300, num_clusters=int(rng.integers(5, 40)), image_size=(64, 64)) for _ in range(3)]
    boxes = np.stack([b for b, _ in images])
    scores = np.stack([s for _, s in images])
    valid = rng.random((3, 300)) < 0.9
    classes = rng.integers(0, 4, (3, 300))
    single = _jitted(nms, 0.5, 64)
    batched = jax.jit(jax.vmap(single))
    indices, is_valid = batched(boxes, scores, valid=valid)
    assert indices.shape == (3, 64) and is_valid.shape == (3, 64)
    for image in range(3):
        expected = greedy_nms_reference(boxes[image], scores[image], 0.5, valid[image])
        np.testing.assert_array_equal(_kept(indices[image], is_valid[image]), expected[:64])
        single_indices, single_valid = single(boxes[image], scores[image], valid=valid[image])
        np.testing.assert_array_equal(indices[image], single_indices)
        np.testing.assert_array_equal(is_valid[image], single_valid)

    class_aware = jax.jit(jax.vmap(_jitted(batched_nms, 0.5, 64)))(boxes, scores, classes)
    for image in range(3):
        expected = greedy_nms_reference(boxes[image], scores[image], 0.5, classes=classes[image])
        np.testing.assert_array_equal(_kept(*(out[image] for out in class_aware)), expected[:64])


def test_traced_threshold_and_fewer_boxes_than_slots(rng):
    boxes, scores = clustered_boxes(rng, 40, num_clusters=8, image_size=(64, 64))
    nms_fn = jax.jit(nms, static_argnames=("max_output",))
    for threshold in (0.3, 0.6):
        indices, valid = nms_fn(boxes, scores, jnp.float32(threshold), max_output=64)
        assert indices.shape == (64,) and indices.dtype == jnp.int32 and valid.dtype == jnp.bool_
        np.testing.assert_array_equal(_kept(indices, valid), greedy_nms_reference(boxes, scores, threshold))


def test_gradient_flows_around_nms(rng):
    """The indices carry no gradient, but a loss on the boxes they select differentiates (no while-loop VJP)."""
    boxes, scores = clustered_boxes(rng, 40, num_clusters=8, image_size=(64, 64))

    def selected_area(boxes):
        indices, valid = nms(boxes, scores, 0.5, 16)
        selected = boxes[indices]
        return jnp.sum(jnp.where(valid, (selected[:, 2] - selected[:, 0]) * (selected[:, 3] - selected[:, 1]), 0.0))

    gradient = np.asarray(jax.jit(jax.grad(selected_area))(boxes))
    kept = greedy_nms_reference(boxes, scores, 0.5)[:16]
    expected = np.zeros_like(boxes)
    height, width = boxes[kept, 3] - boxes[kept, 1], boxes[kept, 2] - boxes[kept, 0]
    expected[kept] = np.stack([-height, -width, height, width], axis=1)
    np.testing.assert_allclose(gradient, expected, rtol=1e-6)
