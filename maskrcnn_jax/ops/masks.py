"""Instance-mask resampling: pasting predicted masks into the image, cropping ground truth to boxes, mask targets.

Coordinates follow DESIGN.md: boxes are (x1, y1, x2, y2) in continuous pixels, pixel `i` covers [i, i + 1) and its
centre is i + 0.5. A fixed-resolution mask of size S over a box covers the box with S x S equal cells; cell `k`
covers [x1 + k * w / S, x1 + (k + 1) * w / S) and is centred at x1 + (k + 0.5) * w / S.

Every resampling here is bilinear and separable in y and x. Pasting and mask targets are written as two small
interpolation matrices per box ([S_out, S_in] for each axis) and a pair of matmuls, never as a dense 4-D sampling
tensor; cropping full-image masks gathers only the rows and columns its samples touch.
"""

import functools

import jax
import jax.numpy as jnp

# Full float32 matmuls: TPU and GPU default to bfloat16 / TF32 passes, which would move values near the 0.5 threshold.
_EXACT = jax.lax.Precision.HIGHEST


def _hat_weights(positions, size):
    """Bilinear weights with zero padding: [..., P] continuous indices -> [..., P, size].

    Sample point at index-coordinate `s` (cell k is centred at s = k) gets weight max(0, 1 - |s - k|) on cell k.
    Inside [0, size - 1] this is ordinary linear interpolation; beyond it the missing neighbour counts as 0, as in
    torch's grid_sample(padding_mode="zeros").
    """
    cells = jnp.arange(size, dtype=positions.dtype)
    return jnp.maximum(0.0, 1.0 - jnp.abs(positions[..., None] - cells))


@functools.partial(jax.jit, static_argnames=("mask_size", "sampling_ratio"))
def crop_masks_to_boxes(full_masks, boxes, mask_size, sampling_ratio=1):
    """Crop full-image masks to their own boxes at a fixed resolution: [G, H, W] x [G, 4] -> [G, S, S] float32.

    This is the ground-truth mask format of DESIGN.md (S = mask_size, e.g. 112). The convention, exactly
    torchvision.ops.roi_align(full_masks[:, None], boxes, S, spatial_scale=1, sampling_ratio, aligned=True):

    - Cell (i, j) of the crop of box (x1, y1, x2, y2) averages sampling_ratio**2 bilinear samples of the full mask at
      y = y1 + (i + (a + 0.5) / sampling_ratio) * (y2 - y1) / S and x = x1 + (j + (b + 0.5) / sampling_ratio) *
      (x2 - x1) / S, for a, b in 0..sampling_ratio-1 (continuous pixel coordinates; pixel k is centred at k + 0.5).
    - Bilinear sampling at a point uses pixel-index coordinates (y - 0.5, x - 0.5). Per axis: a coordinate below -1
      or above the image size samples 0; otherwise it is clamped into [0, size - 1] and linearly interpolated.
      (Since GT boxes lie inside the image this only matters for masks touching the border: the border row/column
      is extended by half a pixel rather than faded to zero.)
    - The result is soft (fractional near the mask's edge); it is not thresholded.

    The TF input pipeline's crop (maskrcnn_jax.data.transforms.crop_masks_to_boxes: tf.image.crop_and_resize on
    adjusted boxes over an edge-replicated mask) follows this convention with sampling_ratio=1, the default here.
    Larger ratios anti-alias crops of boxes much bigger than S pixels.

    Cost is O(G * (S * sampling_ratio * 2)**2) gathers; `full_masks` may be any numeric dtype (bool, uint8, float).
    Jitted, since it is mostly called from data preparation and tests, outside any other jit.
    """
    full_masks = jnp.asarray(full_masks)
    boxes = jnp.asarray(boxes, jnp.float32)
    height, width = full_masks.shape[-2:]
    y_index, y_weight = _sparse_axis_weights(boxes[:, 1], boxes[:, 3], mask_size, height, sampling_ratio)
    x_index, x_weight = _sparse_axis_weights(boxes[:, 0], boxes[:, 2], mask_size, width, sampling_ratio)
    # Gather the (two neighbours x sampling_ratio samples) rows and columns each cell touches: [G, S, T, S, T].
    g = jnp.arange(full_masks.shape[0])[:, None, None, None, None]
    values = full_masks[g, y_index[:, :, :, None, None], x_index[:, None, None, :, :]].astype(jnp.float32)
    return jnp.einsum("gat,gatbu,gbu->gab", y_weight, values, x_weight, precision=_EXACT)


def _sparse_axis_weights(starts, ends, output_size, input_size, sampling_ratio):
    """Sparse per-axis RoIAlign(aligned=True) weights: (indices, weights), each [G, output_size, 2 * sampling_ratio].

    Bin `i` averages `sampling_ratio` samples at
    start - 0.5 + (i + (a + 0.5) / sampling_ratio) * (end - start) / output_size (pixel-index coordinates).
    torchvision's bilinear rule per axis: a sample outside [-1, input_size] is 0; otherwise it is clamped into
    [0, input_size - 1] and linearly interpolated between its two neighbours. The rule acts on each axis separately,
    so 2-D RoIAlign is the outer product of two such axis weightings.
    """
    # torchvision's operation order, so that positions agree with it to within rounding (FMA aside).
    roi_start = starts - 0.5
    bin_size = ((ends - 0.5) - roi_start) / output_size
    bins = jnp.arange(output_size, dtype=jnp.float32)
    samples = jnp.arange(sampling_ratio, dtype=jnp.float32) + 0.5
    positions = (roi_start[:, None, None] + bins[:, None] * bin_size[:, None, None]
                 + samples * bin_size[:, None, None] / sampling_ratio)  # [G, S, sampling_ratio]
    inside = (positions >= -1.0) & (positions <= input_size)
    clamped = jnp.clip(positions, 0.0, input_size - 1.0)
    low = jnp.floor(clamped)
    frac = clamped - low
    low = low.astype(jnp.int32)
    high = jnp.minimum(low + 1, input_size - 1)
    scale = inside.astype(jnp.float32) / sampling_ratio
    indices = jnp.concatenate([low, high], axis=-1)
    weights = jnp.concatenate([(1.0 - frac) * scale, frac * scale], axis=-1)
    return indices, weights


def _box_frame_positions(sample_points, box_start, box_length, grid_size):
    """Map continuous image coordinates into the index frame of a grid_size-cell grid over the box (cell k at k)."""
    safe_length = jnp.where(box_length > 0, box_length, 1.0)
    return (sample_points - box_start) / safe_length * grid_size - 0.5


def mask_targets_from_cropped(gt_crops, gt_boxes, rois, matched_gt, output_size=28, sampling_ratio=2,
                              threshold=0.5):
    """Mask-head training targets for sampled RoIs, from box-cropped ground truth.

    Args:
      gt_crops: [G, M, M] ground-truth masks cropped to their boxes (crop_masks_to_boxes convention).
      gt_boxes: [G, 4] the boxes the crops cover.
      rois: [R, 4] sampled RoIs (proposals), image pixels.
      matched_gt: [R] int index into G of each RoI's ground truth. Entries of RoIs that are not foreground may be
        anything in range; their targets are meaningless and must be masked out by the loss.
      output_size: m, the mask head's resolution (28).
      sampling_ratio: bilinear samples per bin and axis, averaged (fixed, so shapes stay static).
      threshold: targets are binarised as soft >= threshold (detectron2 uses 0.5), returned as float32 {0, 1}.
        None returns the soft values in [0, 1].

    Returns:
      [R, m, m] float32 targets.

    Semantics: bin (i, j) of RoI (x1, y1, x2, y2) averages sampling_ratio**2 samples at the points
    (y1 + (i + (a + 0.5) / sampling_ratio) * (y2 - y1) / m, x1 + (j + (b + 0.5) / sampling_ratio) * (x2 - x1) / m),
    the same points RoIAlign(aligned=True) uses. Each sample reads the matched crop bilinearly in the GT box's frame
    (crop cell k centred at gt_x1 + (k + 0.5) * gt_w / M), with zero padding beyond the outermost cells exactly as
    paste_mask_probabilities reads a predicted mask: a sample outside the GT box reads less than half the edge value
    and one more than half a crop cell outside reads 0. The target therefore approximates detectron2's
    roi_align(full_gt_mask, roi, m, aligned=True) >= 0.5 up to the crop resolution; tests/test_masks.py states and
    asserts how close. Degenerate GT boxes (zero width or height) give all-zero targets.
    """
    gt_crops = jnp.asarray(gt_crops)
    crop_size = gt_crops.shape[-1]
    rois = jnp.asarray(rois, jnp.float32)
    boxes = jnp.asarray(gt_boxes, jnp.float32)[matched_gt]  # [R, 4]
    y_weights = _resample_in_box_weights(rois[:, 1], rois[:, 3], boxes[:, 1], boxes[:, 3], output_size,
                                         crop_size, sampling_ratio)
    x_weights = _resample_in_box_weights(rois[:, 0], rois[:, 2], boxes[:, 0], boxes[:, 2], output_size,
                                         crop_size, sampling_ratio)
    crops = gt_crops[matched_gt].astype(jnp.float32)  # [R, M, M]
    soft = jnp.einsum("rim,rmn,rjn->rij", y_weights, crops, x_weights, precision=_EXACT)
    if threshold is None:
        return soft
    return (soft >= threshold).astype(jnp.float32)


def _resample_in_box_weights(roi_start, roi_end, box_start, box_end, output_size, crop_size, sampling_ratio):
    """[R, output_size, crop_size] weights reading a crop over [box_start, box_end] at a RoI's bin samples."""
    bin_size = (roi_end - roi_start) / output_size
    bins = jnp.arange(output_size, dtype=jnp.float32)
    offsets = (jnp.arange(sampling_ratio, dtype=jnp.float32) + 0.5) / sampling_ratio
    points = roi_start[:, None, None] + (bins[:, None] + offsets) * bin_size[:, None, None]  # [R, m, s]
    box_length = (box_end - box_start)[:, None, None]
    positions = _box_frame_positions(points, box_start[:, None, None], box_length, crop_size)
    weights = _hat_weights(positions, crop_size) * (box_length > 0)[..., None]
    return weights.mean(axis=-2)


def paste_mask_probabilities(masks, boxes, image_size):
    """Resample [N, m, m] mask probabilities into their boxes on an (h, w) image: -> [N, h, w] float32.

    detectron2's `_do_paste_mask` semantics (its GPU path, pasting over the whole image): pixel (y, x) with centre
    (y + 0.5, x + 0.5) reads the m x m grid bilinearly at grid-sample coordinates
    ((y + 0.5 - y1) / (y2 - y1) * 2 - 1, (x + 0.5 - x1) / (x2 - x1) * 2 - 1) with align_corners=False and zero
    padding. In index units: row s = (y + 0.5 - y1) / (y2 - y1) * m - 0.5. The box is never quantized. The value
    fades to 0 within half a mask cell outside the box and is exactly 0 beyond; at the box edge it is at most half
    the edge cell's probability, so with threshold >= 0.5 nothing outside the box is ever set. Boxes with zero or
    negative width or height paste nothing.

    Not torchvision's paste_masks_in_image: that one rounds the box to integers and pads the mask by one cell first.
    """
    masks = jnp.asarray(masks, jnp.float32)
    boxes = jnp.asarray(boxes, jnp.float32)
    height, width = image_size
    mask_size = masks.shape[-1]

    def axis_weights(start, end, image_extent):
        centres = jnp.arange(image_extent, dtype=jnp.float32) + 0.5
        length = end - start
        positions = _box_frame_positions(centres, start[..., None], length[..., None], mask_size)
        return _hat_weights(positions, mask_size) * (length > 0)[..., None, None]

    y_weights = axis_weights(boxes[..., 1], boxes[..., 3], height)  # [N, h, m]
    x_weights = axis_weights(boxes[..., 0], boxes[..., 2], width)  # [N, w, m]
    rows = jnp.einsum("nym,nmk->nyk", y_weights, masks, precision=_EXACT)
    return jnp.einsum("nyk,nxk->nyx", rows, x_weights, precision=_EXACT)


def paste_masks(masks, boxes, image_size, threshold=0.5, chunk_size=8):
    """Paste [N, m, m] mask probabilities into their boxes and binarise: -> [N, h, w] bool (prob >= threshold).

    See paste_mask_probabilities for the resampling. Masks are pasted `chunk_size` at a time so that the float
    intermediate stays at chunk_size * h * w (the bool output is N * h * w bytes: 180 MB for 100 masks at 1333^2).
    """
    masks = jnp.asarray(masks, jnp.float32)
    boxes = jnp.asarray(boxes, jnp.float32)

    def paste_one(mask_and_box):
        mask, box = mask_and_box
        return paste_mask_probabilities(mask[None], box[None], image_size)[0] >= threshold

    return jax.lax.map(paste_one, (masks, boxes), batch_size=min(chunk_size, masks.shape[0]) or None)
