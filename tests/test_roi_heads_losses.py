"""The training losses as the model composes them, each against a plain NumPy reference written from detectron2's
definitions: rpn_losses, sample_rois, box_head_losses and the mask loss (MaskRCNN._positive_roi_losses_on_prefix).

Every batch holds three images: one with ground truth (and a crowd region), one empty (no valid instance: its padded
slots hold random boxes, which must never be read) and one crowd-only. The references share no code with the package:
their IoU, IoA, matching, box encoding, BCE, cross-entropy, smooth-L1 and mask-target resampling are NumPy, float64.
Where a loss depends on the random sample, the reference draws the same sample with ops.sample_balanced (tested in
tests/test_sampling.py) from its own NumPy labels; the other tests use batch sizes that take every eligible candidate,
so that the reference is fully independent.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import ops
from maskrcnn_jax.modeling.defaults import model_config
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN, build_model
from maskrcnn_jax.modeling.roi_heads import box_head_losses, sample_rois
from maskrcnn_jax.modeling.rpn import rpn_losses

RTOL = 1e-5
CROWD_IOA = 0.7  # match_boxes' default, which rpn_losses and sample_rois use
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # detectron2's ROI_BOX_HEAD.BBOX_REG_WEIGHTS


# -- NumPy references ---------------------------------------------------------------------------------------------


def np_iou(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def np_ioa(a, b):
    """Intersection over the area of a (the candidate)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    return inter / area


def np_match(gt, gt_valid, gt_is_crowd, candidates, low, high, allow_low_quality):
    """detectron2's Matcher on IoU with the valid non-crowd ground truth, then crowd regions as ignore.

    Returns (matched [P], labels [P] in {1, 0, -1}).
    """
    usable = gt_valid & ~gt_is_crowd
    iou = np.where(usable[None, :], np_iou(candidates, gt), -1.0)  # [P, G]; unusable columns never win
    best, matched = iou.max(axis=1), iou.argmax(axis=1)
    labels = np.where(best >= high, 1, np.where(best >= low, -1, 0))
    if allow_low_quality:
        best_per_gt = iou.max(axis=0)
        labels[((iou == best_per_gt[None]) & (best_per_gt[None] > 0)).any(axis=1)] = 1
    crowd = gt_valid & gt_is_crowd
    inside_crowd = ((np_ioa(candidates, gt) >= CROWD_IOA) & crowd[None, :]).any(axis=1)
    labels[inside_crowd & (labels != 1)] = -1
    return matched, labels


def np_encode(boxes, references, weights=(1.0, 1.0, 1.0, 1.0)):
    """(dx, dy, dw, dh) taking `references` (anchors, RoIs) to `boxes`."""
    boxes, references = np.asarray(boxes, np.float64), np.asarray(references, np.float64)
    rw, rh = references[:, 2] - references[:, 0], references[:, 3] - references[:, 1]
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    dx = ((boxes[:, 0] + boxes[:, 2]) - (references[:, 0] + references[:, 2])) / 2 / rw
    dy = ((boxes[:, 1] + boxes[:, 3]) - (references[:, 1] + references[:, 3])) / 2 / rh
    return np.stack([weights[0] * dx, weights[1] * dy, weights[2] * np.log(bw / rw), weights[3] * np.log(bh / rh)],
                    axis=1)


def np_bce(logits, targets):
    """-t log sigmoid(x) - (1 - t) log(1 - sigmoid(x))."""
    x, t = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    return np.logaddexp(0.0, x) - x * t


def np_smooth_l1(diff, beta):
    d = np.abs(np.asarray(diff, np.float64))
    if beta == 0:
        return d
    return np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def np_cross_entropy(logits, label):
    logits = np.asarray(logits, np.float64)
    return np.logaddexp.reduce(logits) - logits[label]


def np_mask_target(crop, gt_box, roi, m=28, sampling_ratio=2):
    """Bin (i, j) averages sampling_ratio**2 point samples of the crop, read bilinearly in the GT box's frame (cell
    k centred at x1 + (k + 0.5) * w / M) with zero beyond the outer cells; binarised at 0.5."""
    crop = np.asarray(crop, np.float64)
    size = crop.shape[0]
    offsets = (np.arange(sampling_ratio) + 0.5) / sampling_ratio
    ys = roi[1] + (np.arange(m)[:, None] + offsets).reshape(-1) * (roi[3] - roi[1]) / m  # [m * s]
    xs = roi[0] + (np.arange(m)[:, None] + offsets).reshape(-1) * (roi[2] - roi[0]) / m
    gy = (ys - gt_box[1]) / (gt_box[3] - gt_box[1]) * size - 0.5
    gx = (xs - gt_box[0]) / (gt_box[2] - gt_box[0]) * size - 0.5
    gy, gx = np.meshgrid(gy, gx, indexing="ij")
    y0, x0 = np.floor(gy).astype(int), np.floor(gx).astype(int)
    values = np.zeros(gy.shape)
    for dy in (0, 1):
        for dx in (0, 1):
            iy, ix = y0 + dy, x0 + dx
            weight = (1 - np.abs(gy - iy)) * (1 - np.abs(gx - ix))
            inside = (iy >= 0) & (iy < size) & (ix >= 0) & (ix < size)
            values += np.where(inside, weight * crop[np.clip(iy, 0, size - 1), np.clip(ix, 0, size - 1)], 0.0)
    soft = values.reshape(m, sampling_ratio, m, sampling_ratio).mean(axis=(1, 3))
    return (soft >= 0.5).astype(np.float64)


# -- scenes -------------------------------------------------------------------------------------------------------


def random_boxes(rng, n, size, min_wh, max_wh):
    wh = rng.uniform(min_wh, max_wh, (n, 2))
    xy = rng.uniform(0, size - wh)
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def jittered(rng, boxes, copies, scale):
    """`copies` noisy copies of each box (noise `scale` times its size): candidates with IoUs over the whole range."""
    out = np.repeat(boxes, copies, axis=0)
    wh = np.tile(out[:, 2:] - out[:, :2], 2)
    out = out + (rng.normal(0, scale, out.shape) * wh).astype(np.float32)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 1.0)
    return out


def inside(rng, box, n):
    """n boxes inside `box` (IoA 1 with it)."""
    x1, y1, x2, y2 = box
    a = rng.uniform([x1, y1], [x1 + 0.6 * (x2 - x1), y1 + 0.6 * (y2 - y1)], (n, 2))
    b = rng.uniform(a + 2.0, [x2, y2], (n, 2))
    return np.concatenate([a, b], axis=1).astype(np.float32)


def ground_truth(rng, size=96.0, num_slots=5, num_classes=5):
    """[3, G] padded ground truth: image 0 has 3 instances and a crowd region, image 1 none (random boxes in invalid
    slots), image 2 a crowd region only."""
    boxes = np.stack([random_boxes(rng, num_slots, size, 14, 50) for _ in range(3)])
    classes = rng.integers(1, num_classes, (3, num_slots)).astype(np.int32)
    valid = np.zeros((3, num_slots), bool)
    crowd = np.zeros((3, num_slots), bool)
    valid[0, :4] = True
    crowd[0, 3] = True
    crowd[1] = rng.uniform(size=num_slots) < 0.5  # invalid slots: crowd flags must not matter either
    valid[2, 1] = crowd[2, 1] = True
    boxes[2, 1] = [10.0, 12.0, 70.0, 80.0]
    return boxes, classes, valid, crowd


def candidates_for(rng, gt, gt_valid, gt_is_crowd, num_random, size=96.0):
    """Jittered copies of the non-crowd GT, boxes inside the crowd regions and random boxes."""
    parts = [jittered(rng, gt[gt_valid & ~gt_is_crowd], 6, 0.12)]
    parts += [inside(rng, box, 5) for box in gt[gt_valid & gt_is_crowd]]
    parts.append(random_boxes(rng, num_random, size, 6, 60))
    return np.concatenate(parts)


# -- RPN ----------------------------------------------------------------------------------------------------------

# Jitted: one compile is cheaper than dispatching the matching and sampling op by op.
jit_rpn_losses = jax.jit(rpn_losses, static_argnames=("batch_size_per_image", "positive_fraction", "box_loss_beta"))


def rpn_scene(rng):
    gt, _, valid, crowd = ground_truth(rng)
    # One anchor set for the batch: candidates around image 0's instances and image 2's crowd region, plus random.
    anchors = np.concatenate([candidates_for(rng, gt[0], valid[0], crowd[0], 8),
                              inside(rng, gt[2, 1], 6)])
    num_anchors = anchors.shape[0]
    objectness = rng.normal(0, 3, (3, num_anchors)).astype(np.float32)
    deltas = rng.normal(0, 0.5, (3, num_anchors, 4)).astype(np.float32)
    return objectness, deltas, anchors, gt, valid, crowd


def np_rpn_losses(objectness, deltas, anchors, gt, valid, crowd, beta, batch_size_per_image, sampled_indices):
    """detectron2: BCE over sampled anchors and smooth-L1 over sampled positives, both sums over the batch divided by
    num_images * batch_size_per_image. sampled_indices(b, labels) -> the anchors image b samples."""
    cls = box = 0.0
    for b in range(objectness.shape[0]):
        matched, labels = np_match(gt[b], valid[b], crowd[b], anchors, 0.3, 0.7, True)
        index = sampled_indices(b, labels)
        assert (labels[index] != -1).all()
        cls += np_bce(objectness[b, index], labels[index] == 1).sum()
        positive = index[labels[index] == 1]
        target = np_encode(gt[b, matched[positive]], anchors[positive])
        box += np_smooth_l1(deltas[b, positive] - target, beta).sum()
    normalizer = objectness.shape[0] * batch_size_per_image
    return cls / normalizer, box / normalizer


@pytest.mark.parametrize("beta", [0.0, 1.0 / 9])
def test_rpn_losses_when_every_eligible_anchor_is_sampled(rng, beta):
    objectness, deltas, anchors, gt, valid, crowd = rpn_scene(rng)
    batch_size_per_image = 64
    assert anchors.shape[0] <= batch_size_per_image  # every eligible anchor is sampled: no randomness left

    def everything_eligible(b, labels):
        assert (labels == 1).sum() <= batch_size_per_image // 2
        return np.flatnonzero(labels != -1)

    key = jax.random.key(int(rng.integers(1 << 30)))
    got = jit_rpn_losses(key, objectness, deltas, anchors, gt, valid, crowd, batch_size_per_image=batch_size_per_image,
                     positive_fraction=0.5, box_loss_beta=beta)
    want_cls, want_box = np_rpn_losses(objectness, deltas, anchors, gt, valid, crowd, beta, batch_size_per_image,
                                       everything_eligible)
    np.testing.assert_allclose(float(got["rpn_cls"]), want_cls, rtol=RTOL)
    np.testing.assert_allclose(float(got["rpn_box"]), want_box, rtol=RTOL)
    # The scene exercises positives, the ignore band and the crowd region.
    labels = [np_match(gt[b], valid[b], crowd[b], anchors, 0.3, 0.7, True)[1] for b in range(3)]
    assert (labels[0] == 1).sum() >= 3 and (labels[0] == -1).any() and (labels[2] == -1).sum() >= 6
    assert (labels[1] == 0).all()


def test_rpn_losses_on_a_random_subsample(rng):
    objectness, deltas, anchors, gt, valid, crowd = rpn_scene(rng)
    batch_size_per_image, fraction = 12, 0.25
    key = jax.random.key(int(rng.integers(1 << 30)))
    keys = jax.random.split(key, 3)  # rpn_losses draws image b's sample with the b-th split of its key

    def drawn(b, labels):
        index, sampled, _ = ops.sample_balanced(keys[b], labels, batch_size_per_image, fraction)
        index = np.asarray(index)[np.asarray(sampled)]
        positives, negatives = (labels == 1).sum(), (labels == 0).sum()
        assert len(index) == min(positives, 3) + min(negatives, batch_size_per_image - min(positives, 3))
        return index

    got = jit_rpn_losses(key, objectness, deltas, anchors, gt, valid, crowd, batch_size_per_image=batch_size_per_image,
                     positive_fraction=fraction, box_loss_beta=1.0 / 9)
    want_cls, want_box = np_rpn_losses(objectness, deltas, anchors, gt, valid, crowd, 1.0 / 9, batch_size_per_image,
                                       drawn)
    np.testing.assert_allclose(float(got["rpn_cls"]), want_cls, rtol=RTOL)
    np.testing.assert_allclose(float(got["rpn_box"]), want_box, rtol=RTOL)


def test_rpn_loss_gradients_reach_exactly_the_sampled_anchors(rng):
    objectness, deltas, anchors, gt, valid, crowd = rpn_scene(rng)
    key = jax.random.key(0)

    def total(objectness, deltas):
        losses = rpn_losses(key, objectness, deltas, jnp.asarray(anchors), gt, valid, crowd, batch_size_per_image=64)
        return losses["rpn_cls"] + losses["rpn_box"]

    grad_objectness, grad_deltas = jax.jit(jax.grad(total, argnums=(0, 1)))(objectness, deltas)
    grad_objectness, grad_deltas = np.asarray(grad_objectness), np.asarray(grad_deltas)
    assert np.isfinite(grad_objectness).all() and np.isfinite(grad_deltas).all()
    for b in range(3):
        _, labels = np_match(gt[b], valid[b], crowd[b], anchors, 0.3, 0.7, True)
        # d BCE / dx = (sigmoid(x) - t) / (B * 64) on every sampled (here: every eligible) anchor, 0 elsewhere.
        want = np.where(labels != -1, (1 / (1 + np.exp(-objectness[b].astype(np.float64))) - (labels == 1)), 0.0)
        np.testing.assert_allclose(grad_objectness[b], want / (3 * 64), rtol=1e-4, atol=1e-9)
        np.testing.assert_array_equal((grad_deltas[b] != 0).any(axis=1), labels == 1)


# -- RoI sampling -------------------------------------------------------------------------------------------------


def roi_scene(rng, num_proposals=36):
    gt, classes, valid, crowd = ground_truth(rng)
    proposals = []
    for b in range(3):
        p = candidates_for(rng, gt[b], valid[b], crowd[b], 12)
        p = np.concatenate([p, random_boxes(rng, num_proposals, 96.0, 6, 60)])[:num_proposals]
        proposals.append(p[rng.permutation(num_proposals)])
    proposals = np.stack(proposals)
    proposal_valid = rng.uniform(size=(3, num_proposals)) < 0.9
    return proposals, proposal_valid, gt, classes, valid, crowd


def np_roi_labels(proposals, proposal_valid, gt, valid, crowd):
    """Candidates (proposals, then every GT box), their labels at IoU 0.5 and matched GT; invalid ones ignored."""
    candidates = np.concatenate([proposals, gt])
    matched, labels = np_match(gt, valid, crowd, candidates, 0.5, 0.5, False)
    labels = np.where(np.concatenate([proposal_valid, valid & ~crowd]), labels, -1)
    return candidates, matched, labels


def candidate_index(candidates, rois):
    """Which candidate each sampled RoI is (candidates are distinct random boxes)."""
    hits = (candidates[None, :, :] == rois[:, None, :]).all(axis=2)
    assert (hits.sum(axis=1) == 1).all()
    return hits.argmax(axis=1)


# Jitted: one compile is cheaper than dispatching the matching and sampling op by op.
jit_sample_rois = jax.jit(sample_rois, static_argnames=("batch_size_per_image", "positive_fraction"))


def run_sample_rois(rng, scene, batch_size_per_image, positive_fraction):
    key = jax.random.key(int(rng.integers(1 << 30)))
    sampled = jit_sample_rois(key, *scene, batch_size_per_image=batch_size_per_image,
                              positive_fraction=positive_fraction)
    return {name: np.asarray(value) for name, value in sampled.items()}


def check_sample(sampled, b, scene, num_positive, num_negative):
    """Layout (positives, negatives, padding), labels, matches and classes of image b against the reference."""
    proposals, proposal_valid, gt, classes, valid, crowd = scene
    candidates, matched, labels = np_roi_labels(proposals[b], proposal_valid[b], gt[b], valid[b], crowd[b])
    slots = np.arange(sampled["valid"].shape[1])
    np.testing.assert_array_equal(sampled["positive"][b], slots < num_positive)
    np.testing.assert_array_equal(sampled["valid"][b], slots < num_positive + num_negative)
    index = candidate_index(candidates, sampled["rois"][b][sampled["valid"][b]])
    assert len(set(index.tolist())) == len(index)
    positive = sampled["positive"][b][sampled["valid"][b]]
    np.testing.assert_array_equal(labels[index], np.where(positive, 1, 0))
    np.testing.assert_array_equal(sampled["matched_gt"][b][:num_positive], matched[index[positive]])
    want_classes = np.zeros_like(slots)
    want_classes[:num_positive] = classes[b][matched[index[positive]]]
    np.testing.assert_array_equal(sampled["classes"][b], want_classes)
    return candidates, labels, index


def test_sample_rois_takes_every_eligible_candidate_when_the_batch_allows(rng):
    scene = roi_scene(rng)
    proposals, proposal_valid, gt, classes, valid, crowd = scene
    sampled = run_sample_rois(rng, scene, batch_size_per_image=64, positive_fraction=0.5)
    for b in range(3):
        _, _, labels = np_roi_labels(proposals[b], proposal_valid[b], gt[b], valid[b], crowd[b])
        assert (labels == 1).sum() <= 32 and (labels != -1).sum() <= 64  # the sample is every eligible candidate
        _, _, index = check_sample(sampled, b, scene, (labels == 1).sum(), (labels == 0).sum())
        np.testing.assert_array_equal(np.sort(index), np.flatnonzero(labels != -1))
        # The GT boxes are candidates: every valid non-crowd one is sampled as a positive matched to itself.
        for g in np.flatnonzero(valid[b] & ~crowd[b]):
            slot = np.flatnonzero((sampled["rois"][b] == gt[b, g]).all(axis=1) & sampled["valid"][b])
            assert len(slot) == 1 and sampled["positive"][b, slot[0]] and sampled["matched_gt"][b, slot[0]] == g
        # Crowd regions: their GT box is no candidate, and what lies inside them is neither positive nor negative.
        crowd_boxes = gt[b][valid[b] & crowd[b]]
        rois = sampled["rois"][b][sampled["valid"][b]]
        assert not any((rois == box).all(axis=1).any() for box in crowd_boxes)
        if len(crowd_boxes):
            assert (np_ioa(rois, crowd_boxes).max(axis=1)[~sampled["positive"][b][sampled["valid"][b]]]
                    < CROWD_IOA).all()
            assert (np_ioa(proposals[b], crowd_boxes).max(axis=1) >= CROWD_IOA).sum() >= 5  # the scene has some
    assert sampled["positive"][0].sum() >= 6 and not sampled["positive"][1:].any()  # empty / crowd-only: negatives


def test_sample_rois_subsamples_with_detectron2_counts(rng):
    scene = roi_scene(rng)
    proposals, proposal_valid, gt, _, valid, crowd = scene
    batch_size_per_image, fraction = 16, 0.25
    max_positive = int(batch_size_per_image * fraction)
    sampled = run_sample_rois(rng, scene, batch_size_per_image, fraction)
    for b in range(3):
        _, _, labels = np_roi_labels(proposals[b], proposal_valid[b], gt[b], valid[b], crowd[b])
        num_positive = min((labels == 1).sum(), max_positive)
        num_negative = min((labels == 0).sum(), batch_size_per_image - num_positive)
        check_sample(sampled, b, scene, num_positive, num_negative)
    # The first int(batch_size_per_image * positive_fraction) slots hold every positive.
    assert sampled["positive"][0, :max_positive].all() and not sampled["positive"][:, max_positive:].any()
    assert sampled["rois"].shape == (3, batch_size_per_image, 4)


def test_sample_rois_passes_no_gradient(rng):
    proposals, proposal_valid, gt, classes, valid, crowd = roi_scene(rng)
    key = jax.random.key(1)

    def total(proposals, gt):
        sampled = sample_rois(key, proposals, proposal_valid, gt, classes, valid, crowd, batch_size_per_image=16)
        return jnp.sum(sampled["rois"] * sampled["valid"][..., None])

    assert float(jax.jit(total)(proposals, gt)) != 0.0
    for grad in jax.jit(jax.grad(total, argnums=(0, 1)))(proposals, gt):
        assert not np.asarray(grad).any()


# -- box head -----------------------------------------------------------------------------------------------------


def np_box_head_losses(class_logits, box_deltas, sampled, gt, beta):
    """Cross-entropy averaged over sampled RoIs; smooth-L1 over positives' ground-truth-class deltas (weights
    10, 10, 5, 5) summed and divided by the number of sampled RoIs."""
    ce = reg = 0.0
    count = 0
    for b, s in zip(*np.nonzero(sampled["valid"])):
        label = sampled["classes"][b, s]
        ce += np_cross_entropy(class_logits[b, s], label)
        count += 1
        if sampled["positive"][b, s]:
            target = np_encode(gt[b, sampled["matched_gt"][b, s]][None], sampled["rois"][b, s][None], BOX_WEIGHTS)
            reg += np_smooth_l1(box_deltas[b, s, label] - target[0], beta).sum()
    return ce / count, reg / count


@pytest.mark.parametrize("beta", [0.0, 1.0 / 9])
def test_box_head_losses_match_the_reference(rng, beta):
    scene = roi_scene(rng)
    gt = scene[2]
    sampled = run_sample_rois(rng, scene, batch_size_per_image=24, positive_fraction=0.25)
    num_classes = 6
    class_logits = rng.normal(0, 2, (3, 24, num_classes)).astype(np.float32)
    box_deltas = rng.normal(0, 0.5, (3, 24, num_classes, 4)).astype(np.float32)
    got = box_head_losses(class_logits, box_deltas, sampled, gt, box_loss_beta=beta)
    want_cls, want_reg = np_box_head_losses(class_logits, box_deltas, sampled, gt, beta)
    np.testing.assert_allclose(float(got["box_cls"]), want_cls, rtol=RTOL)
    np.testing.assert_allclose(float(got["box_reg"]), want_reg, rtol=RTOL)
    assert sampled["positive"].sum() >= 4 and (sampled["valid"] & ~sampled["positive"]).sum() >= 20


def test_box_head_losses_ignore_padding_that_points_at_a_zero_gt_slot(rng):
    """Padding slots and negatives may point at a zero-padded GT box (log 0 in its regression target): the losses
    and their gradients stay finite, and equal the reference over the valid slots alone."""
    gt = np.zeros((1, 3, 4), np.float32)
    gt[0, 0] = random_boxes(rng, 1, 64.0, 10, 40)[0]
    rois = np.concatenate([jittered(rng, gt[0, :1], 2, 0.05), random_boxes(rng, 4, 64.0, 5, 30)])[None]
    sampled = {"rois": rois, "valid": np.array([[True, True, True, True, False, False]]),
               "positive": np.array([[True, True, False, False, False, False]]),
               "classes": np.array([[2, 2, 0, 0, 0, 0]], np.int32), "matched_gt": np.array([[0, 0, 1, 2, 1, 2]])}
    class_logits = rng.normal(0, 2, (1, 6, 4)).astype(np.float32)
    box_deltas = rng.normal(0, 0.5, (1, 6, 4, 4)).astype(np.float32)
    got = box_head_losses(class_logits, box_deltas, sampled, gt)
    want_cls, want_reg = np_box_head_losses(class_logits, box_deltas, sampled, gt, 0.0)
    np.testing.assert_allclose(float(got["box_cls"]), want_cls, rtol=RTOL)
    np.testing.assert_allclose(float(got["box_reg"]), want_reg, rtol=RTOL)
    grads = jax.grad(lambda l, d: sum(box_head_losses(l, d, sampled, gt).values()), argnums=(0, 1))(
        class_logits, box_deltas)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert not np.asarray(grads[0])[0, 4:].any() and not np.asarray(grads[1])[0, 2:].any()


# -- mask loss ----------------------------------------------------------------------------------------------------


def mask_model(num_classes, batch_size_per_image, positive_fraction, mask_loss="sigmoid"):
    c = model_config()
    c.num_classes = num_classes
    c.roi_heads.mask_head = "mlp"  # cheapest; the loss assembly does not depend on the head
    c.roi_heads.fc_dim = 16
    c.roi_heads.batch_size_per_image = batch_size_per_image
    c.roi_heads.positive_fraction = positive_fraction
    c.roi_heads.mask_loss = mask_loss
    c.roi_heads.mask_roi_buckets = 2  # prefixes of 4 and 8 RoIs: the switch is exercised, and compiles twice only
    return build_model(c)


def test_mask_loss_as_the_model_assembles_it(rng):
    """MaskRCNN._positive_roi_losses_on_prefix (and _positive_roi_losses, which picks a prefix bucket) against the reference on the mask
    logits it computed: per positive RoI the target resampled from its matched GT's crop, BCE on the channel of that
    GT's class, averaged over positive RoIs and their 28 x 28 pixels. Negatives and padding carry no loss."""
    scene = roi_scene(rng)
    proposals, proposal_valid, gt, classes, valid, crowd = scene
    num_classes, batch_size_per_image, fraction, crop = 5, 32, 0.25, 14
    prefix = int(batch_size_per_image * fraction)
    sampled = jit_sample_rois(jax.random.key(int(rng.integers(1 << 30))), *scene,
                              batch_size_per_image=batch_size_per_image, positive_fraction=fraction)
    gt_masks = (rng.uniform(size=(3, gt.shape[1], crop, crop)) < 0.6).astype(np.float32)
    levels = [rng.normal(0, 1, (3, 96 // s, 96 // s, 4)).astype(np.float32) for s in (4, 8, 16, 32)]
    pyramid = ops.flatten_pyramid(levels, (4, 8, 16, 32))
    model = mask_model(num_classes, batch_size_per_image, fraction)
    operands = (pyramid, sampled, {"gt_masks": gt_masks, "gt_boxes": gt})
    # Jitted: one compile each is cheaper than running the RoIAlign and the head op by op.
    variables = jax.jit(lambda *o: model.init(jax.random.key(0), prefix, *o,
                                              method=MaskRCNN._positive_roi_losses_on_prefix))(*operands)
    # Logits of order 1: at its initialisation (normal(0.001) predictor) every logit is ~0, and the loss ~log 2 would
    # hardly depend on the targets.
    variables = jax.tree.map(lambda p: rng.normal(0, 1.5 / np.sqrt(p.shape[0]), p.shape).astype(np.float32),
                             variables)
    losses, state = jax.jit(lambda v, *o: model.apply(v, prefix, *o, method=MaskRCNN._positive_roi_losses_on_prefix,
                                                      capture_intermediates=True, mutable=["intermediates"]))(
        variables, *operands)
    assert set(losses) == {"mask"}
    loss = losses["mask"]
    logits = np.asarray(state["intermediates"]["mask_head"]["__call__"][0])  # [3, prefix, 28, 28, num_classes]
    assert logits.shape == (3, prefix, 28, 28, num_classes)

    s = {name: np.asarray(value) for name, value in sampled.items()}
    total, count = 0.0, 0
    for b, r in zip(*np.nonzero(s["positive"])):
        g = s["matched_gt"][b, r]
        target = np_mask_target(gt_masks[b, g], gt[b, g].astype(np.float64), s["rois"][b, r].astype(np.float64))
        assert s["classes"][b, r] == classes[b, g]
        total += np_bce(logits[b, r, :, :, classes[b, g]], target).sum()
        count += 1
    assert count >= 4 and s["positive"][:, prefix:].sum() == 0
    assert 0.5 < np.abs(logits).mean() < 5
    np.testing.assert_allclose(float(loss), total / (count * 28 * 28), rtol=RTOL)
    bucketed = jax.jit(lambda v, *o: model.apply(v, *o, method=MaskRCNN._positive_roi_losses))(variables, *operands)
    np.testing.assert_allclose(float(bucketed["mask"]), float(loss), rtol=RTOL)
