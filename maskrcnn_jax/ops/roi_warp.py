"""RoIWarp (Dai et al., MNC 2016; the Mask R-CNN paper's Table 2c): RoIPool's quantized RoI, RoIAlign's bilinear
sampling. NHWC, single-level and FPN multi-level, average or max over each bin's samples.

Definition, per box and axis (x shown; y is the same with heights):

- Quantization, exactly RoIPool's (`roi_pool.quantized_rois`): x1q = round(x1 * scale), x2q = round(x2 * scale),
  rounded half away from zero in float32 like torchvision's roi_pool. The RoI covers cells x1q .. x1q + w - 1
  with w = max(x2q - x1q + 1, 1), i.e. the continuous interval [x1q, x1q + w) where cell i covers [i, i + 1).
- Bins: w / ow cells each, not quantized (RoIPool's floor/ceil bin edges are not used): bin p is
  [x1q + p * w / ow, x1q + (p + 1) * w / ow).
- Samples: sampling_ratio evenly spaced points per bin along each axis, at the centres of its sub-cells,
  x1q + p * w / ow + (g + 0.5) * w / (ow * sampling_ratio), g = 0 .. sampling_ratio - 1. Each is read by
  bilinear interpolation between the cell centres i + 0.5, without any rounding of the sample.
- Border, RoIAlign's (torchvision) rule, in index coordinates u = X - 0.5 of a sample at continuous X: a sample
  with u outside [-1, size] reads 0; u in [-1, 0] reads cell 0; u >= size - 1 reads the last cell.
- Reduction: "avg" is the mean of the sampling_ratio**2 samples (outside samples count as 0); "max" is the
  largest, its gradient going to the 4 bilinear neighbours of the winning sample (the first in row-major sample
  order on ties).

So RoIWarp "avg" is torchvision.ops.roi_align(aligned=True, spatial_scale=1) on the pre-quantized boxes
(x1q, y1q, x1q + w, y1q + h) in feature cells; tests/test_roi_warp.py checks exactly that against torchvision.
torchvision has no RoIWarp and no max mode; "max" is checked against a NumPy reference. There is no gradient
w.r.t. the boxes (quantization has none anyway).

The sampling is RoIAlign's own (`roi_align._sample_bins`): one fused gather of C-vectors per bilinear tap, one
chain of scatter-adds for the gradient, and the multi-level version reads one flattened pyramid with the same
FPN level assignment as `multilevel_roi_align` (from the unquantized boxes).
"""

import functools

import jax.numpy as jnp

from maskrcnn_jax.ops.roi_align import (
    _check_roi_reduce,
    _check_sampling_ratio,
    _output_hw,
    _pool_multilevel,
    _pool_single_level,
    _sample_bins,
)
from maskrcnn_jax.ops.roi_pool import quantized_rois

# Cell i's value sits at continuous coordinate i + 0.5; `_sample_bins` puts it at i.
CELL_CENTRE = 0.5


def _warp_frame(boxes, scale):
    """RoIPool's quantized RoI in `_sample_bins`' frame: (y_start, x_start, roi_h, roi_w), [N] float32."""
    y1, x1, roi_h, roi_w = quantized_rois(boxes, scale)
    centre = jnp.float32(CELL_CENTRE)
    return (
        y1.astype(jnp.float32) - centre,
        x1.astype(jnp.float32) - centre,
        roi_h.astype(jnp.float32),
        roi_w.astype(jnp.float32),
    )


def _roi_warp_flat(flat_features, boxes, scale, height, width, offset, output_hw, sampling_ratio, roi_reduce):
    """RoIWarp of one image whose feature map(s) are flattened to [P, C]; see `roi_align._sample_bins`."""
    frame = _warp_frame(boxes, scale)
    return _sample_bins(flat_features, frame, height, width, offset, output_hw, sampling_ratio, roi_reduce)


def _pool_image_fn(output_size, sampling_ratio, roi_reduce):
    return functools.partial(
        _roi_warp_flat,
        output_hw=_output_hw(output_size),
        sampling_ratio=_check_sampling_ratio(sampling_ratio),
        roi_reduce=_check_roi_reduce(roi_reduce),
    )


def roi_warp(features, boxes, output_size, spatial_scale, sampling_ratio, roi_reduce="avg"):
    """RoIWarp, NHWC: bilinear samples of RoIPool's quantized RoI (definition in the module docstring).

    Args:
      features: [B, H, W, C].
      boxes: [B, N, 4] (x1, y1, x2, y2) in input-image pixels; box n of image b pools from features[b].
      output_size: int or (oh, ow).
      spatial_scale: feature cells per input pixel (1 / stride).
      sampling_ratio: samples per bin along each axis, a static int >= 1.
      roi_reduce: "avg" or "max" over each bin's sampling_ratio**2 samples.

    Returns:
      [B, N, oh, ow, C]. With "avg", torchvision.ops.roi_align(aligned=True, spatial_scale=1) on the quantized
      boxes; with "max", no torchvision equivalent. Differentiable w.r.t. `features`.
    """
    pool_image = _pool_image_fn(output_size, sampling_ratio, roi_reduce)
    return _pool_single_level(pool_image, features, boxes, spatial_scale)


def multilevel_roi_warp(features, boxes, output_size, strides, sampling_ratio, roi_reduce="avg"):
    """RoIWarp from an FPN pyramid, each box on the level `fpn_level_for_boxes` assigns (as multilevel_roi_align).

    Args:
      features: list of [B, H_l, W_l, C], finest first, with consecutive power-of-two `strides`, or a FlatPyramid.
      boxes: [B, N, 4] in input-image pixels.
      output_size: int or (oh, ow).
      strides: e.g. (4, 8, 16, 32).
      sampling_ratio: static int >= 1.
      roi_reduce: "avg" or "max".

    Returns:
      [B, N, oh, ow, C]; for each box, `roi_warp` on its own level with spatial_scale 1 / stride. All levels are
      read by one fused gather from the flattened pyramid.
    """
    pool_image = _pool_image_fn(output_size, sampling_ratio, roi_reduce)
    return _pool_multilevel(pool_image, features, boxes, strides)
