"""Keypoint heatmaps -> keypoints for final detections, on the host, in NumPy alone.

This module imports nothing from the rest of the package: copied next to an exported model it decodes that model's
keypoint heatmaps without this codebase. It cannot have static shapes (each box's heatmaps are resized to the box's
own size in pixels), which is why it runs on the host rather than in the compiled network.

Conventions (DESIGN.md): boxes are (x1, y1, x2, y2) in continuous pixels of the network input, pixel `i` covers
[i, i + 1). Heatmaps are NHWC like every head's output: [D, m, m, K], one m x m map of logits per keypoint type.

Both peers decode the same way up to the score:

1. Each box's size is clamped to at least one pixel, w = max(x2 - x1, 1), and the K maps are resized to
   ceil(h) x ceil(w) by torch's bicubic interpolation (F.interpolate(mode="bicubic", align_corners=False): Keys'
   cubic kernel with a = -0.75, output pixel o reads the input at (o + 0.5) * in / out - 0.5, taps beyond the
   border repeat the border value, no antialiasing).
2. The first maximum of each resized map (row-major) is the keypoint's pixel (x_int, y_int).
3. The half-pixel offset is applied here, in box-relative resized pixels: x = (x_int + 0.5) * (w / ceil(w)) + x1,
   and likewise y. (x_int + 0.5) is the centre of the resized pixel, and w / ceil(w) shrinks the ceil(w) resized
   pixels back onto the box's true width. This is the inverse of ops.keypoints.keypoint_targets, which floors.

The score:

- "torchvision" (roi_heads.heatmaps_to_keypoints): the resized map's value at the maximum, a logit.
- "detectron2" (structures/keypoints.py heatmaps_to_keypoints, keeping its (x, y, score) columns as its
  keypoint_rcnn_inference does): a softmax-like score, exp(peak - peak) / sum over the m x m *unresized* map of
  exp(logit - peak) = 1 / sum(exp(map - peak)), where peak is the resized map's maximum. Normalising over the
  m x m map instead of the box's pixels keeps scores of large and small boxes comparable. Always > 0.

The coordinate offset is the same in both decoders; where the peers differ is at the COCO boundary, which is not
this module's: detectron2 reads COCO keypoints (integer pixel indices) as index + 0.5 and writes results as
x - 0.5, while torchvision uses COCO's numbers as they are in both directions. Whoever reads annotations and
writes results must pick one convention and apply it on both sides.

Values are computed in float64 from the (possibly float32 or bfloat16) heatmaps, so this is the exact bicubic
resize of the given numbers; torch resizes in float32, and differs by its rounding (about 1e-6 of the logits'
range). Only a near tie between two resized pixels, closer than that rounding, can pick a different pixel.
"""

from __future__ import annotations

import numpy as np

KEYPOINT_DECODE_RULES = ("torchvision", "detectron2")

# Keys' cubic convolution parameter in torch's bicubic (and OpenCV's); -0.5 would be Catmull-Rom.
_CUBIC_A = -0.75
# Resized float64 values held at once per box (32 MiB): large boxes are resized a few keypoint types at a time.
_MAX_RESIZED_VALUES = 1 << 22


def _cubic_kernel(distance: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel at |distance| (nonzero on (-2, 2))."""
    d = np.abs(distance)
    a = _CUBIC_A
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    far = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
    return np.where(d <= 1.0, near, np.where(d < 2.0, far, 0.0))


def bicubic_resize_matrix(input_size: int, output_size: int) -> np.ndarray:
    """[output_size, input_size] float64 matrix M with resized = M @ signal, torch's 1-D bicubic (a = -0.75,
    align_corners=False).

    Output pixel o reads the input at src = (o + 0.5) * scale - 0.5 with scale = float32(input_size / output_size),
    rounded once to float32 as torch computes it (a fused multiply-add on x86). Its four taps floor(src) - 1 ..
    floor(src) + 2 weigh Keys' kernel at their distance from src; taps beyond either border read the border sample,
    so their weights add onto it. Every row sums to 1.
    """
    scale = np.float32(input_size) / np.float32(output_size)
    source = (np.float64(scale) * (np.arange(output_size) + 0.5) - 0.5).astype(np.float32).astype(np.float64)
    base = np.minimum(np.floor(source), input_size - 1)
    fraction = np.clip(source - base, 0.0, 1.0)
    offsets = np.arange(-1, 3)
    weights = _cubic_kernel(fraction[:, None] - offsets)  # [out, 4]
    taps = np.clip(base[:, None].astype(np.int64) + offsets, 0, input_size - 1)
    matrix = np.zeros((output_size, input_size))
    np.add.at(matrix, (np.repeat(np.arange(output_size), 4), taps.ravel()), weights.ravel())
    return matrix


def resize_bicubic(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[N, h, w] -> [N, H, W] float64: torch's F.interpolate(maps[:, None], size, mode="bicubic",
    align_corners=False), separably: rows with one small matrix, columns with another."""
    maps = np.asarray(maps, np.float64)
    rows = bicubic_resize_matrix(maps.shape[-2], size[0])
    columns = bicubic_resize_matrix(maps.shape[-1], size[1])
    return rows @ maps @ columns.T


def heatmaps_to_keypoints(heatmaps, boxes, rule: str = "torchvision") -> np.ndarray:
    """Decode keypoint heatmaps of final detections into keypoints: -> [D, K, 3] float32 (x, y, score).

    Args:
      heatmaps: [D, m, m, K] keypoint logits (NHWC, the keypoint head's layout), any float dtype.
      boxes: [D, 4] the detections' boxes (x1, y1, x2, y2) in the pixels the keypoints should come out in.
      rule: "torchvision" (score = the resized logit at the maximum) or "detectron2" (score = 1 / sum over the
        m x m map of exp(logit - resized maximum)); see the module docstring for the shared decoding.

    (x, y) are in the boxes' pixels, the continuous coordinates of DESIGN.md. torchvision returns the same (x, y)
    with a third column of ones plus the scores apart; detectron2 returns these three columns. Boxes smaller than
    a pixel decode as one-pixel boxes, as in both peers.
    """
    if rule not in KEYPOINT_DECODE_RULES:
        raise ValueError(f"rule must be one of {KEYPOINT_DECODE_RULES}, got {rule!r}")
    heatmaps = np.asarray(heatmaps)
    boxes = np.asarray(boxes, np.float32)
    if heatmaps.ndim != 4 or boxes.ndim != 2 or boxes.shape[-1] != 4 or heatmaps.shape[0] != boxes.shape[0]:
        raise ValueError(f"expected heatmaps [D, m, m, K] and boxes [D, 4], got {heatmaps.shape} and {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise ValueError("boxes must be finite")
    num_keypoints = heatmaps.shape[-1]
    # float32 box arithmetic in the peers' order, so that coordinates agree with theirs to the last bit.
    widths = np.maximum(boxes[:, 2] - boxes[:, 0], np.float32(1))
    heights = np.maximum(boxes[:, 3] - boxes[:, 1], np.float32(1))
    keypoints = np.zeros((boxes.shape[0], num_keypoints, 3), np.float32)
    for d, box in enumerate(boxes):
        maps = np.moveaxis(heatmaps[d], -1, 0).astype(np.float64)  # [K, m, m]
        out_height, out_width = int(np.ceil(heights[d])), int(np.ceil(widths[d]))
        rows = bicubic_resize_matrix(maps.shape[-2], out_height)
        columns = bicubic_resize_matrix(maps.shape[-1], out_width).T
        chunk = max(1, _MAX_RESIZED_VALUES // (out_height * out_width))
        positions = np.zeros(num_keypoints, np.int64)
        peaks = np.zeros(num_keypoints)
        for start in range(0, num_keypoints, chunk):
            resized = (rows @ maps[start:start + chunk] @ columns).reshape(-1, out_height * out_width)
            positions[start:start + chunk] = resized.argmax(axis=1)
            peaks[start:start + chunk] = resized.max(axis=1)
        y_int, x_int = np.divmod(positions, out_width)
        width_correction = widths[d] / np.float32(out_width)
        height_correction = heights[d] / np.float32(out_height)
        keypoints[d, :, 0] = (x_int.astype(np.float32) + np.float32(0.5)) * width_correction + box[0]
        keypoints[d, :, 1] = (y_int.astype(np.float32) + np.float32(0.5)) * height_correction + box[1]
        if rule == "torchvision":
            keypoints[d, :, 2] = peaks
        else:
            keypoints[d, :, 2] = 1.0 / np.exp(maps - peaks[:, None, None]).sum(axis=(1, 2))
    return keypoints
