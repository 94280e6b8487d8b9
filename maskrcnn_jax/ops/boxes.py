"""Axis-aligned box arithmetic on (x1, y1, x2, y2) boxes in continuous pixel coordinates."""

import math

import jax.numpy as jnp

# detectron2 / torchvision clamp on dw, dh so exp() cannot overflow.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)
# Box extents below this are encoded as this, so that no regression target is ever infinite or NaN.
MIN_ENCODED_EXTENT = 1e-6


def box_area(boxes):
    """Area of [..., 4] boxes; degenerate boxes (x2 < x1) have area <= 0 as in torchvision."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _intersection(boxes1, boxes2):
    top_left = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = jnp.maximum(bottom_right - top_left, 0.0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1, boxes2):
    """Pairwise IoU: [..., N, 4] x [..., M, 4] -> [..., N, M].

    Pairs whose union is empty (two zero-area boxes) get IoU 0 instead of NaN.
    """
    inter = _intersection(boxes1, boxes2)
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def box_ioa(boxes1, boxes2):
    """Pairwise intersection over the area of boxes1: [..., N, 4] x [..., M, 4] -> [..., N, M].

    Used for crowd regions: a candidate that lies mostly inside a crowd box has high IoA.
    """
    inter = _intersection(boxes1, boxes2)
    area1 = box_area(boxes1)[..., :, None]
    return jnp.where(area1 > 0, inter / jnp.where(area1 > 0, area1, 1.0), 0.0)


def encode_boxes(boxes, anchors, weights=(1.0, 1.0, 1.0, 1.0)):
    """Regression targets (dx, dy, dw, dh) that take `anchors` to `boxes` (torchvision BoxCoder.encode).

    Always finite: a width or height below MIN_ENCODED_EXTENT (a zero-padded ground-truth slot, say) is taken as
    MIN_ENCODED_EXTENT, where torchvision would return -inf or NaN. Masked losses multiply such targets by a zero
    cotangent, and zero times an infinite difference is NaN.
    """
    wx, wy, ww, wh = weights
    anchor_w = anchors[..., 2] - anchors[..., 0]
    anchor_h = anchors[..., 3] - anchors[..., 1]
    anchor_cx = anchors[..., 0] + 0.5 * anchor_w
    anchor_cy = anchors[..., 1] + 0.5 * anchor_h
    box_w = boxes[..., 2] - boxes[..., 0]
    box_h = boxes[..., 3] - boxes[..., 1]
    box_cx = boxes[..., 0] + 0.5 * box_w
    box_cy = boxes[..., 1] + 0.5 * box_h
    anchor_w, anchor_h, box_w, box_h = (jnp.maximum(extent, MIN_ENCODED_EXTENT)
                                        for extent in (anchor_w, anchor_h, box_w, box_h))
    dx = wx * (box_cx - anchor_cx) / anchor_w
    dy = wy * (box_cy - anchor_cy) / anchor_h
    dw = ww * jnp.log(box_w / anchor_w)
    dh = wh * jnp.log(box_h / anchor_h)
    return jnp.stack([dx, dy, dw, dh], axis=-1)


def encode_matched_boxes(matched_boxes, anchors, positive, weights=(1.0, 1.0, 1.0, 1.0)):
    """Regression targets of the positive anchors (or RoIs); exactly zero for the others, whose matched boxes
    may be padding. [..., 4], [..., 4], [...] -> [..., 4]."""
    boxes = jnp.where(positive[..., None], matched_boxes, anchors)
    return encode_boxes(boxes, anchors, weights)


def decode_boxes(deltas, anchors, weights=(1.0, 1.0, 1.0, 1.0), clamp=DEFAULT_SCALE_CLAMP):
    """Apply (dx, dy, dw, dh) deltas to `anchors` (torchvision BoxCoder.decode_single).

    dw and dh are clamped to `clamp` before exp(), so large deltas cannot overflow.
    """
    deltas = deltas.astype(jnp.float32)
    anchors = anchors.astype(jnp.float32)
    wx, wy, ww, wh = weights
    anchor_w = anchors[..., 2] - anchors[..., 0]
    anchor_h = anchors[..., 3] - anchors[..., 1]
    anchor_cx = anchors[..., 0] + 0.5 * anchor_w
    anchor_cy = anchors[..., 1] + 0.5 * anchor_h
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, clamp)
    dh = jnp.minimum(deltas[..., 3] / wh, clamp)
    cx = dx * anchor_w + anchor_cx
    cy = dy * anchor_h + anchor_cy
    half_w = 0.5 * (jnp.exp(dw) * anchor_w)
    half_h = 0.5 * (jnp.exp(dh) * anchor_h)
    return jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)


def clip_boxes(boxes, height, width):
    """Clip [..., 4] boxes to the image [0, width] x [0, height]."""
    limits = jnp.stack([width, height, width, height]).astype(boxes.dtype)
    return jnp.clip(boxes, 0.0, limits)


def min_size_mask(boxes, min_size):
    """True for boxes whose width and height are both >= `min_size` (torchvision remove_small_boxes)."""
    width = boxes[..., 2] - boxes[..., 0]
    height = boxes[..., 3] - boxes[..., 1]
    return (width >= min_size) & (height >= min_size)
