import jax
import numpy as np
import pytest

from maskrcnn_jax.ops.matching import match_boxes, match_quality_matrix


def _detectron2_matcher(quality, low, high, allow_low_quality_matches):
    """NumPy port of detectron2's Matcher.__call__ (labels [0, -1, 1] on thresholds [low, high]).

    One deliberate difference, as documented in ops.matching: a ground truth whose best quality is 0 does not
    turn its zero-quality candidates positive.
    """
    num_gt, num_candidates = quality.shape
    if num_gt == 0:
        return np.zeros(num_candidates, np.int64), np.zeros(num_candidates, np.int64)
    matched_vals = quality.max(axis=0)
    matches = quality.argmax(axis=0)
    labels = np.ones(num_candidates, np.int64)
    bounds = [-np.inf, low, high, np.inf]
    for label, lo, hi in zip([0, -1, 1], bounds[:-1], bounds[1:]):
        labels[(matched_vals >= lo) & (matched_vals < hi)] = label
    if allow_low_quality_matches:
        highest = quality.max(axis=1)
        gt_inds, pred_inds = np.nonzero((quality == highest[:, None]) & (highest[:, None] > 0))
        labels[pred_inds] = 1
    return matches, labels


def _intersections(boxes1, boxes2):
    """[N, M] intersection areas of float64 boxes."""
    iw = np.minimum(boxes1[:, None, 2], boxes2[None, :, 2]) - np.maximum(boxes1[:, None, 0], boxes2[None, :, 0])
    ih = np.minimum(boxes1[:, None, 3], boxes2[None, :, 3]) - np.maximum(boxes1[:, None, 1], boxes2[None, :, 1])
    return np.clip(iw, 0, None) * np.clip(ih, 0, None)


def _numpy_iou(boxes1, boxes2):
    """IoU in float64 from the definition, independent of ops.box_iou."""
    boxes1, boxes2 = boxes1.astype(np.float64), boxes2.astype(np.float64)
    inter = _intersections(boxes1, boxes2)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area(boxes1)[:, None] + area(boxes2)[None, :] - inter)


def _reference_match_boxes(gt_boxes, gt_valid, gt_is_crowd, candidates, low, high, allow_low, crowd_thresh):
    iou = _numpy_iou(gt_boxes, candidates)
    usable = gt_valid & ~gt_is_crowd
    matches, labels = _detectron2_matcher(iou[usable], low, high, allow_low)
    matches = np.flatnonzero(usable)[matches] if usable.any() else matches
    crowd = gt_boxes[gt_valid & gt_is_crowd].astype(np.float64)
    if len(crowd):
        c = candidates.astype(np.float64)
        inter = _intersections(c, crowd)
        area = ((c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1]))[:, None]
        ioa = np.where(area > 0, inter / np.where(area > 0, area, 1), 0)
        labels[(ioa >= crowd_thresh).any(axis=1) & (labels != 1)] = -1
    return matches, labels


def _boxes(rng, n, size=200.0, min_wh=4.0, max_wh=80.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(min_wh, max_wh, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def _scene(rng, num_gt=12, num_random=300):
    gt = _boxes(rng, num_gt)
    # Jittered copies of GT boxes give a full range of IoUs, not just near-zero ones.
    jittered = np.repeat(gt, 10, axis=0) + rng.normal(0, 6, (num_gt * 10, 4)).astype(np.float32)
    jittered[:, 2:] = np.maximum(jittered[:, 2:], jittered[:, :2] + 1)
    candidates = np.concatenate([jittered, _boxes(rng, num_random)])
    gt_valid = rng.uniform(size=num_gt) < 0.8
    gt_is_crowd = rng.uniform(size=num_gt) < 0.2
    return gt, gt_valid, gt_is_crowd, candidates


@pytest.mark.parametrize("low,high,allow_low", [(0.3, 0.7, True), (0.5, 0.5, False), (0.4, 0.5, False)])
def test_match_boxes_matches_detectron2_port(rng, low, high, allow_low):
    for _ in range(3):
        gt, gt_valid, gt_is_crowd, candidates = _scene(rng)
        matched, labels = match_boxes(gt, gt_valid, gt_is_crowd, candidates, low, high, allow_low, 0.7)
        want_matched, want_labels = _reference_match_boxes(gt, gt_valid, gt_is_crowd, candidates, low, high,
                                                           allow_low, 0.7)
        np.testing.assert_array_equal(np.asarray(labels), want_labels)
        np.testing.assert_array_equal(np.asarray(matched), want_matched)
        assert set(np.unique(want_labels)) >= {0, 1}  # the scene exercises both sides of the thresholds


def test_quality_matrix_with_many_ties_matches_port(rng):
    # Coarsely quantized qualities make ties within rows and columns the rule, not the exception.
    quality = (rng.integers(0, 11, (7, 60)) / 10.0).astype(np.float32)
    quality[2] = 0.0  # a ground truth that overlaps nothing claims nothing
    valid = np.ones(7, bool)
    matched, labels = match_quality_matrix(quality, valid, 0.3, 0.7, True)
    want_matched, want_labels = _detectron2_matcher(quality, 0.3, 0.7, True)
    np.testing.assert_array_equal(np.asarray(labels), want_labels)
    np.testing.assert_array_equal(np.asarray(matched), want_matched)


def test_low_quality_ties_all_become_positive():
    gt = np.array([[0, 0, 10, 10]], np.float32)
    # Two candidates with exactly the same (low) IoU with the GT, one worse, one disjoint.
    candidates = np.array([[5, 0, 15, 10], [-5, 0, 5, 10], [8, 0, 18, 10], [50, 50, 60, 60]], np.float32)
    matched, labels = match_boxes(gt, [True], [False], candidates, 0.3, 0.7, True)
    np.testing.assert_array_equal(np.asarray(labels), [1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(matched), [0, 0, 0, 0])
    _, labels = match_boxes(gt, [True], [False], candidates, 0.3, 0.7, False)
    np.testing.assert_array_equal(np.asarray(labels), [-1, -1, 0, 0])


def test_low_quality_positive_keeps_its_argmax_gt():
    # Candidate 0 is GT 1's best match, but it overlaps GT 0 more: it is positive and matched to GT 0.
    gt = np.array([[0, 0, 10, 10], [6, 0, 30, 10]], np.float32)
    candidates = np.array([[2, 0, 12, 10], [100, 100, 110, 110]], np.float32)
    matched, labels = match_boxes(gt, [True, True], [False, False], candidates, 0.3, 0.7, True)
    np.testing.assert_array_equal(np.asarray(labels), [1, 0])
    assert int(matched[0]) == 0


def test_padded_and_crowd_gt_never_match():
    gt = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [100, 100, 120, 120]], np.float32)
    gt_valid = np.array([True, False, True])
    gt_is_crowd = np.array([False, False, True])
    candidates = np.array([
        [0, 0, 10, 10],  # exactly GT 0: positive
        [20, 20, 40, 40],  # exactly the padded GT: negative
        [101, 101, 119, 119],  # inside the crowd box: ignore
        [95, 95, 115, 115],  # half inside the crowd box (IoA 0.56): negative
        [0, 0, 9, 10],  # IoU 0.9 with GT 0: positive even though it is not inside a crowd
    ], np.float32)
    matched, labels = match_boxes(gt, gt_valid, gt_is_crowd, candidates, 0.3, 0.7, True, 0.7)
    np.testing.assert_array_equal(np.asarray(labels), [1, 0, -1, 0, 1])
    np.testing.assert_array_equal(np.asarray(matched)[[0, 4]], [0, 0])
    _, labels = match_boxes(gt, gt_valid, gt_is_crowd, candidates, 0.3, 0.7, True, None)
    assert int(labels[2]) == 0


def test_positive_inside_crowd_stays_positive():
    gt = np.array([[0, 0, 10, 10], [0, 0, 20, 20]], np.float32)
    matched, labels = match_boxes(gt, [True, True], [False, True], np.array([[0, 0, 10, 10]], np.float32))
    assert int(labels[0]) == 1 and int(matched[0]) == 0


def test_no_valid_gt_means_all_negative(rng):
    gt = _boxes(rng, 4)
    candidates = np.concatenate([gt, _boxes(rng, 20)])
    matched, labels = match_boxes(gt, np.zeros(4, bool), np.zeros(4, bool), candidates, 0.3, 0.7, True)
    assert (np.asarray(labels) == 0).all() and (np.asarray(matched) == 0).all()
    matched, labels = match_boxes(np.zeros((0, 4), np.float32), np.zeros(0, bool), np.zeros(0, bool), candidates)
    assert (np.asarray(labels) == 0).all() and matched.shape == (24,)


def test_jit_and_vmap_over_images(rng):
    scenes = [_scene(rng, num_gt=6, num_random=50) for _ in range(3)]
    stacked = [np.stack(parts) for parts in zip(*scenes)]
    batched = jax.jit(jax.vmap(lambda g, v, c, p: match_boxes(g, v, c, p, 0.3, 0.7, True)))(*stacked)
    for i, scene in enumerate(scenes):
        single = match_boxes(*scene, 0.3, 0.7, True)
        np.testing.assert_array_equal(np.asarray(batched[0][i]), np.asarray(single[0]))
        np.testing.assert_array_equal(np.asarray(batched[1][i]), np.asarray(single[1]))


def test_matches_torchvision_matcher(rng):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from torchvision.models.detection._utils import Matcher

    gt, _, _, candidates = _scene(rng)
    iou = _numpy_iou(gt, candidates).astype(np.float32)
    matched, labels = match_quality_matrix(iou, np.ones(len(gt), bool), 0.3, 0.7, True)
    # torchvision encodes labels in the match index: -1 below low, -2 between, else the GT index.
    tv = Matcher(0.7, 0.3, allow_low_quality_matches=True)(torch.tensor(iou)).numpy()
    want_labels = np.where(tv == -1, 0, np.where(tv == -2, -1, 1))
    np.testing.assert_array_equal(np.asarray(labels), want_labels)
    np.testing.assert_array_equal(np.asarray(matched)[tv >= 0], tv[tv >= 0])
