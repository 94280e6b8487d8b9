"""Keypoint R-CNN training targets and loss: each keypoint is a one-hot mask over its RoI's m x m grid.

Keypoints are (x, y, visibility) in continuous input pixels (DESIGN.md: pixel `i` covers [i, i + 1)). A keypoint's
target is the grid cell that contains it, written as one flat index y_cell * m + x_cell into the m * m positions; the
loss is a softmax cross-entropy over those positions in the keypoint's own channel. Decoding predicted heatmaps back
into keypoints happens on the host (serving/keypoints.py), where a cell decodes to its centre, so that encoding and
decoding agree (Heckbert's d = floor(c), c = d + 0.5, as torchvision and detectron2 say).

Everything here has static shapes and works under jit, vmap and grad.
"""

import jax.numpy as jnp

from maskrcnn_jax.ops.losses import softmax_cross_entropy

KEYPOINT_LOSS_NORMALIZATIONS = ("torchvision", "detectron2")


def _at_least_float32(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _grid_cell(coordinate, start, end, heatmap_size):
    """Cell index along one axis (float, floored) and whether it lies on the grid.

    torchvision's arithmetic in its order: scale = m / (end - start), which torch evaluates as
    (1 / (end - start)) * m (Tensor.__rtruediv__: two roundings), then floor((c - start) * scale); a coordinate
    exactly equal to `end` goes to the last cell. The roundings matter: they decide the side of a keypoint on a
    cell boundary, e.g. midway across the RoI. (A backend without IEEE division, such as the TPU's, may decide such
    ties differently.) For a zero-length RoI torchvision divides by zero and gets NaN or +-inf, which no cell
    accepts except through that `end` rule; we reach the same verdicts without computing an infinity (DESIGN.md: no
    target, masked or not, may be infinite or NaN).
    """
    length = end - start
    has_length = length != 0
    scale = (1.0 / jnp.where(has_length, length, 1.0)) * heatmap_size
    cell = jnp.floor((coordinate - start) * scale)
    on_end = coordinate == end
    on_grid = on_end | (has_length & (cell >= 0) & (cell < heatmap_size))
    cell = jnp.where(on_end, heatmap_size - 1, cell)
    return jnp.where(on_grid, cell, 0.0), on_grid


def keypoint_targets(keypoints, rois, heatmap_size):
    """One-hot heatmap targets of ground-truth keypoints on their RoIs' m x m grids.

    Args:
      keypoints: [..., K, 3] (x, y, visibility) in input pixels: the keypoints of each RoI's matched ground truth.
        Zero-padded keypoints (visibility 0) are fine.
      rois: [..., 4] (x1, y1, x2, y2) RoIs (proposals), same leading shape. Degenerate or zero-padded RoIs are fine.
      heatmap_size: m, a Python int (56 in Keypoint R-CNN).

    Returns:
      target_index: [..., K] int32 in [0, m * m): y_cell * m + x_cell, and 0 where not valid.
      valid: [..., K] bool: visibility > 0 and the keypoint on the RoI's grid.

    The rule is torchvision's keypoints_to_heatmap, which detectron2's keypoints_to_heatmap (structures/keypoints.py)
    repeats line for line: x_cell = floor((x - x1) * ((1 / (x2 - x1)) * m)), in float32 and in that order, likewise
    for y; a keypoint exactly on the right (bottom) edge x == x2 goes to cell m - 1; a keypoint is valid where both
    cells lie in [0, m) and visibility > 0 (COCO's 1, labelled but occluded, counts). So the RoI covers the closed
    interval [x1, x2]. A RoI of zero width or height accepts only keypoints exactly on its edge (x == x1 == x2), as
    torchvision does through its edge rule. No value computed here is infinite or NaN, for any RoI.
    """
    keypoints, rois = _at_least_float32(keypoints), _at_least_float32(rois)
    dtype = jnp.promote_types(keypoints.dtype, rois.dtype)
    keypoints, rois = keypoints.astype(dtype), rois.astype(dtype)
    rois = rois[..., None, :]  # broadcast over the K keypoints
    x_cell, x_on_grid = _grid_cell(keypoints[..., 0], rois[..., 0], rois[..., 2], heatmap_size)
    y_cell, y_on_grid = _grid_cell(keypoints[..., 1], rois[..., 1], rois[..., 3], heatmap_size)
    valid = x_on_grid & y_on_grid & (keypoints[..., 2] > 0)
    target_index = (y_cell.astype(jnp.int32) * heatmap_size + x_cell.astype(jnp.int32)) * valid
    return target_index.astype(jnp.int32), valid


def detectron2_keypoint_loss_normalizer(num_images, num_keypoints, batch_size_per_image=512, positive_fraction=0.25):
    """detectron2's fixed normaliser (NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS=False): the number of keypoints the
    sampled foreground RoIs of a full batch would carry, num_images * K * batch_size_per_image * positive_fraction.
    detectron2 recommends LOSS_WEIGHT 4.0 with it (1.0 with the default visible-keypoint normalisation)."""
    return num_images * num_keypoints * batch_size_per_image * positive_fraction


def keypoint_loss(logits, target_index, valid, normalization="detectron2", normalizer=None):
    """Keypoint R-CNN loss: softmax cross-entropy over each keypoint channel's m * m positions.

    Args:
      logits: [..., m, m, K] NHWC keypoint-head output (any float dtype; computed in at least float32).
      target_index: [..., K] int flat positions from keypoint_targets (entries where not valid may be anything).
      valid: [..., K] bool from keypoint_targets, times whatever RoI mask the caller has (foreground, real slot).
      normalization: "torchvision" or "detectron2".
        - "torchvision" (keypointrcnn_loss): the mean over valid keypoints, F.cross_entropy's default reduction.
        - "detectron2" (keypoint_rcnn_loss): the sum over valid keypoints divided by `normalizer`. With
          normalizer=None (NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS=True, its default) that is the number of valid
          keypoints in the batch, the same value as torchvision's; a number is its fixed normaliser (see
          detectron2_keypoint_loss_normalizer), which weighs images with few keypoints less. detectron2 then
          multiplies by ROI_KEYPOINT_HEAD.LOSS_WEIGHT: that is the caller's. ("Visible" in detectron2 means `valid`
          here: visibility > 0 and inside the RoI.)
      normalizer: only for "detectron2", see above.

    Both peers normalise over the whole batch (they concatenate every image's RoIs), so pass the batch's RoIs
    together (leading axes [B, R] are fine) rather than averaging per-image losses. With no valid keypoint the loss
    is 0 (both peers return logits.sum() * 0) and its gradient is 0: the denominator is at least 1, and invalid
    entries are selected away, so they leak no NaN into the value or the gradient.
    """
    if normalization not in KEYPOINT_LOSS_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {KEYPOINT_LOSS_NORMALIZATIONS}, got {normalization!r}")
    if normalization == "torchvision" and normalizer is not None:
        raise ValueError("torchvision's keypoint loss is a mean over valid keypoints and takes no normalizer")
    logits = jnp.asarray(logits)
    *leading, height, width, num_keypoints = logits.shape
    if height != width:
        raise ValueError(f"keypoint heatmaps must be square, got {height} x {width}")
    # [..., m, m, K] -> [..., K, m * m]: one softmax over the positions of each keypoint's channel.
    per_keypoint = jnp.swapaxes(logits.reshape(*leading, height * width, num_keypoints), -1, -2)
    return softmax_cross_entropy(per_keypoint, target_index, valid, normalizer)
