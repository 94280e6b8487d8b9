"""Assigning ground truth to candidate boxes (anchors or proposals): detectron2's `Matcher`, with static shapes."""

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops.boxes import box_ioa, box_iou

POSITIVE = 1
NEGATIVE = 0
IGNORE = -1


def match_quality_matrix(quality, gt_valid, low_threshold, high_threshold, allow_low_quality_matches):
    """detectron2 `Matcher` on a [G, P] quality matrix (IoU) with padded ground truth.

    Args:
      quality: [G, P] match quality of each ground truth with each candidate (higher is better, IoU in [0, 1]).
      gt_valid: [G] bool; rows with False (padding, or ground truth that must not be matched) never match.
      low_threshold, high_threshold: a candidate's best quality q over valid rows gives its label:
        q < low -> 0 (negative), low <= q < high -> -1 (ignore), q >= high -> 1 (positive). With
        low == high there is no ignore band (the RoI-head matcher).
      allow_low_quality_matches: additionally make positive every candidate whose quality with some valid ground
        truth equals that ground truth's best quality over all candidates (all ties), provided that best is > 0.
        (detectron2 also lets a ground truth whose best is 0 claim every candidate; here it claims none.)

    Returns:
      matched_gt: [P] int32, the argmax over valid rows (lowest index on ties), as detectron2 returns it whatever
        the label; 0 when there is no valid row. A low-quality positive keeps its argmax ground truth, as in
        detectron2 and torchvision.
      labels: [P] int32 in {1, 0, -1}.
    """
    return _match_candidate_major(jnp.swapaxes(quality, -1, -2), gt_valid, low_threshold, high_threshold,
                                  allow_low_quality_matches)


def _match_candidate_major(quality, gt_valid, low_threshold, high_threshold, allow_low_quality_matches):
    """match_quality_matrix on a [P, G] matrix.

    Candidate-major layout puts the per-candidate reductions (P of them, over G) on the contiguous axis, which is
    ~3x faster than [G, P] for 200k anchors on a CPU.
    """
    num_candidates, num_gt = quality.shape
    if num_gt == 0:
        return jnp.zeros(num_candidates, jnp.int32), jnp.full(num_candidates, NEGATIVE, jnp.int32)
    # -1 is below every real quality and below any threshold, so padded columns never win or count.
    masked = jnp.where(gt_valid[None, :], quality.astype(jnp.float32), -1.0)
    # Every comparison below is between entries of this one matrix and its own maxima. The barrier pins it as a
    # single materialized array, so the compiler cannot recompute it in two fusions with different rounding.
    masked = jax.lax.optimization_barrier(masked)

    best_quality = masked.max(axis=1, keepdims=True)
    # First index attaining the max: argmax, but as a min-reduction XLA vectorizes well.
    gt_index = jnp.arange(num_gt, dtype=jnp.int32)
    matched_gt = jnp.where(masked == best_quality, gt_index, num_gt).min(axis=1)
    best_quality = best_quality[:, 0]
    labels = jnp.where(best_quality >= high_threshold, POSITIVE,
                       jnp.where(best_quality >= low_threshold, IGNORE, NEGATIVE)).astype(jnp.int32)
    if allow_low_quality_matches:
        best_per_gt = masked.max(axis=0, keepdims=True)
        is_best_for_some_gt = ((masked == best_per_gt) & (best_per_gt > 0)).any(axis=1)
        labels = jnp.where(is_best_for_some_gt, POSITIVE, labels)
    return matched_gt, labels


def match_boxes(gt_boxes, gt_valid, gt_is_crowd, candidates, low_threshold=0.3, high_threshold=0.7,
                allow_low_quality_matches=True, crowd_ioa_threshold=0.7):
    """Match candidates [P, 4] to padded ground truth [G, 4] by IoU, with crowd regions as ignore.

    Args:
      gt_boxes: [G, 4]; gt_valid: [G] bool (False for padding); gt_is_crowd: [G] bool.
      candidates: [P, 4] anchors or proposals.
      low_threshold, high_threshold, allow_low_quality_matches: see match_quality_matrix. detectron2 uses
        (0.3, 0.7, True) for the RPN and (0.5, 0.5, False) for the RoI heads.
      crowd_ioa_threshold: a candidate that is not positive and lies at least this much inside a valid crowd box
        (intersection / candidate area) is ignored (-1). Crowd boxes never match. None disables the rule.

    Returns:
      (matched_gt [P] int32, labels [P] int32 in {1 positive, 0 negative, -1 ignore}). With no valid non-crowd
      ground truth every candidate is negative (or ignore inside a crowd box) with matched_gt 0.
    """
    gt_valid = jnp.asarray(gt_valid, bool)
    gt_is_crowd = jnp.asarray(gt_is_crowd, bool)
    iou = box_iou(candidates, gt_boxes)  # [P, G]
    matched_gt, labels = _match_candidate_major(iou, gt_valid & ~gt_is_crowd, low_threshold, high_threshold,
                                                allow_low_quality_matches)
    if crowd_ioa_threshold is not None and gt_boxes.shape[0] > 0:
        crowd = gt_valid & gt_is_crowd
        inside_crowd = ((box_ioa(candidates, gt_boxes) >= crowd_ioa_threshold) & crowd[None, :]).any(axis=1)
        labels = jnp.where(inside_crowd & (labels != POSITIVE), IGNORE, labels)
    return matched_gt, labels
