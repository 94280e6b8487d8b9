"""RoIAlign (He et al., 2017) on NHWC features, single-level and FPN multi-level.

The numbers follow `torchvision.ops.roi_align` exactly: each output bin averages a fixed
`sampling_ratio x sampling_ratio` grid of bilinear samples, a sample outside [-1, size] along either axis
contributes 0, coordinates in [-1, 0] clamp to 0, and a sample past the last row/column reads that row/column.
`roi_reduce="max"` (the paper's Table 2c ablation; torchvision has no such mode) takes the largest of the same
samples instead of their mean.

Design: bilinear interpolation is separable, so every sample reads 4 pixels whose row indices depend only on
(box, output row, grid row) and whose column indices depend only on (box, output column, grid column). The op is
written as a sum of (2 * sampling_ratio)**2 terms, each one gather of C-vectors (C is the contiguous axis in NHWC)
times a weight of shape [N, oh, ow]. XLA fuses all the gathers and the weighted sum into a single loop, so nothing
larger than the output is materialised; the gradient is the matching chain of scatter-adds into one buffer. As in
torchvision, there is no gradient w.r.t. the boxes. The multi-level version flattens all levels into one
[sum(H_l * W_l), C] array and does the same single gather with per-box offset/height/width/scale.

"max" runs the same gathers as a running max in one loop; for its gradient the forward keeps the winning sample
of each (bin, channel), and the backward is the same chain of scatter-adds, each sample sending only what it won.
The sampling (`_sample_bins`) takes any RoI frame (start and extent per axis); RoIWarp (roi_warp.py) feeds it
RoIPool's quantized boxes.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# FPN paper, Eqn. (1): a 224 x 224 box is pooled from level 4 (stride 16).
CANONICAL_SCALE = 224
CANONICAL_LEVEL = 4
LEVEL_EPS = 1e-6


def _output_hw(output_size):
    if isinstance(output_size, int):
        return output_size, output_size
    oh, ow = output_size
    return int(oh), int(ow)


def _check_sampling_ratio(sampling_ratio):
    if not isinstance(sampling_ratio, (int, np.integer)) or sampling_ratio < 1:
        raise ValueError(
            f"sampling_ratio must be a Python int >= 1, got {sampling_ratio!r}. torchvision's adaptive "
            "sampling_ratio <= 0 (ceil(roi_size / output_size) samples per bin) depends on the box, "
            "so it has no static shape under jit."
        )
    return int(sampling_ratio)


ROI_REDUCTIONS = ("avg", "max")


def _check_roi_reduce(roi_reduce):
    if roi_reduce not in ROI_REDUCTIONS:
        raise ValueError(f"roi_reduce must be one of {ROI_REDUCTIONS}, got {roi_reduce!r}")
    return roi_reduce


def rounded_product(a, b):
    """a * b rounded to float32 on its own, before it is added to anything.

    XLA's code generator contracts `x + a * b` into one fused multiply-add, which skips this rounding and moves
    sample points by an ulp against torchvision's C++. A select between the multiply and the add (identity for
    every value, NaN included) blocks the contraction.
    """
    product = a * b
    return jnp.where(product == product, product, jnp.nan)


def exact_divide(numerator, denominator):
    """numerator / denominator rounded like C++ float division (and torch).

    XLA rewrites a division by a broadcast value into a multiplication by its reciprocal, which is an ulp off
    for divisors such as 3 or 7 and would move sample points against torchvision. Dividing by an array that
    carries the numerator's own shape (and batching) keeps a true division.
    """
    return numerator / (numerator * 0.0 + denominator)


def _axis_taps(start, bin_size, num_bins, grid, size):
    """Bilinear taps of every sample point along one axis, torchvision's rules.

    Args:
      start, bin_size: [N] float32, in feature-map pixels (box start after scaling and the aligned offset).
      num_bins: output bins along the axis; grid: samples per bin.
      size: feature-map extent along the axis, a Python int or an [N] int32 array.

    Returns:
      low, high: [N, num_bins, grid] int32 neighbour indices, always inside [0, size - 1].
      w_low, w_high: [N, num_bins, grid] float32 weights; both 0 for samples outside [-1, size].
    """
    size = jnp.asarray(size, jnp.int32)
    if size.ndim:
        size = size[:, None, None]
    size_f = size.astype(jnp.float32)
    bins = jnp.arange(num_bins, dtype=jnp.float32)[:, None]
    grid_offsets = jnp.arange(grid, dtype=jnp.float32)[None, :] + 0.5
    start = start[:, None, None]
    bin_size = bin_size[:, None, None]
    # Same rounding steps as torchvision: (start + p * bin) + ((g + 0.5) * bin) / grid.
    bin_starts = rounded_product(bins, bin_size)
    coord = (start + bin_starts) + exact_divide(grid_offsets * bin_size, jnp.float32(grid))
    # Written as "in range" so NaN coordinates count as outside, as in torchvision.
    inside = (coord >= -1.0) & (coord <= size_f)
    # Outside samples get weight 0; park them on pixel 0 so NaN/inf never reach the integer cast.
    coord = jnp.where(inside, jnp.maximum(coord, 0.0), 0.0)
    low = jnp.clip(jnp.floor(coord), 0, size_f - 1).astype(jnp.int32)
    at_edge = low >= size - 1
    high = jnp.where(at_edge, low, low + 1)
    # Past the last pixel torchvision snaps the coordinate onto it: all weight on `low`.
    frac = jnp.where(at_edge, 0.0, coord - low.astype(jnp.float32))
    w_high = jnp.where(inside, frac, 0.0)
    w_low = jnp.where(inside, 1.0 - frac, 0.0)
    return low, high, w_low, w_high


def _align_frame(boxes, scale, aligned):
    """RoIAlign's continuous RoI of each box in feature pixels: (y_start, x_start, roi_h, roi_w), [N] float32."""
    scale = jnp.asarray(scale, jnp.float32)
    pixel_offset = jnp.float32(0.5 if aligned else 0.0)
    scaled = rounded_product(boxes, scale[..., None])
    x1 = scaled[:, 0] - pixel_offset
    y1 = scaled[:, 1] - pixel_offset
    x2 = scaled[:, 2] - pixel_offset
    y2 = scaled[:, 3] - pixel_offset
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not aligned:
        # torchvision forces malformed RoIs to at least 1 x 1 only in the legacy mode.
        roi_w = jnp.maximum(roi_w, 1.0)
        roi_h = jnp.maximum(roi_h, 1.0)
    return y1, x1, roi_h, roi_w


def _sample_bins(flat_features, frame, height, width, offset, output_hw, sampling_ratio, roi_reduce):
    """Bilinear samples of every bin of every box of one image, reduced by "avg" or "max": [N, oh, ow, C].

    `frame` is (y_start, x_start, roi_h, roi_w), [N] float32 in the sampling frame of `_axis_taps` (pixel i's
    value sits at coordinate i). Each axis splits into equal bins with `sampling_ratio` evenly spaced samples
    per bin. `height`, `width`, `offset` are Python ints (one map) or [N] int32 arrays (each box's FPN level):
    box n reads the row-major [height, width] map that starts at row `offset` of `flat_features` [P, C].
    """
    oh, ow = output_hw
    grid = sampling_ratio
    y1, x1, roi_h, roi_w = frame
    bin_w = exact_divide(roi_w, jnp.float32(ow))
    bin_h = exact_divide(roi_h, jnp.float32(oh))

    y_low, y_high, wy_low, wy_high = _axis_taps(y1, bin_h, oh, grid, height)
    x_low, x_high, wx_low, wx_high = _axis_taps(x1, bin_w, ow, grid, width)

    width = jnp.asarray(width, jnp.int32)
    offset = jnp.asarray(offset, jnp.int32)
    if width.ndim:
        width = width[:, None, None]
    if offset.ndim:
        offset = offset[:, None, None]
    # Row start of every sampled row in the flat array: [N, oh, grid] each.
    row_starts = [offset + y_low * width, offset + y_high * width]
    row_weights = [wy_low, wy_high]
    cols = [x_low, x_high]
    col_weights = [wx_low, wx_high]
    # The mean's 1 / grid**2 rides on the weights; the max compares raw bilinear values.
    inv_count = jnp.float32(1.0 / (grid * grid))

    # (2 * grid)**2 terms, sample by sample (4 neighbours each), one flat pixel per output bin and its weight:
    # [T, N, oh, ow].
    indices, weights = [], []
    for iy in range(grid):
        for ix in range(grid):
            for row_start, wy in zip(row_starts, row_weights):
                for col, wx in zip(cols, col_weights):
                    indices.append(row_start[:, :, iy, None] + col[:, None, :, ix])
                    weight = wy[:, :, iy, None] * wx[:, None, :, ix]
                    weights.append(weight * inv_count if roi_reduce == "avg" else weight)
    indices, weights = jnp.stack(indices), jnp.stack(weights)
    if roi_reduce == "avg":
        return _weighted_gather(flat_features, indices, weights)
    # [grid**2 samples, 4 neighbours, N, oh, ow]
    return _max_of_samples(flat_features, indices.reshape(grid * grid, 4, *indices.shape[1:]),
                           weights.reshape(grid * grid, 4, *weights.shape[1:]))


def _roi_align_flat(flat_features, boxes, scale, height, width, offset, output_hw, sampling_ratio, aligned,
                    roi_reduce):
    """RoIAlign of one image whose feature map(s) are flattened to [P, C]; see `_sample_bins`.

    `scale` is a Python scalar (one map) or an [N] array (each box's FPN level).
    """
    frame = _align_frame(boxes, scale, aligned)
    return _sample_bins(flat_features, frame, height, width, offset, output_hw, sampling_ratio, roi_reduce)


def _sum_of_weighted_gathers(flat_features, indices, weights):
    """sum_t flat_features[indices[t]] * weights[t]: [P, C], [T, ...], [T, ...] -> [..., C]."""
    out = None
    for index, weight in zip(indices, weights):
        term = flat_features.at[index].get(mode="promise_in_bounds")
        term = term * weight[..., None].astype(term.dtype)
        out = term if out is None else out + term
    return out


@jax.custom_vjp
def _weighted_gather(flat_features, indices, weights):
    """sum_t flat_features[indices[t]] * weights[t]: [P, C], [T, ...], [T, ...] -> [..., C]. XLA fuses the gathers
    and the weighted sum into one loop, so nothing larger than the output is materialised."""
    return _sum_of_weighted_gathers(flat_features, indices, weights)


def _weighted_gather_forward(flat_features, indices, weights):
    return _weighted_gather(flat_features, indices, weights), (flat_features, indices, weights)


def _weighted_gather_backward(residuals, grad):
    """The feature gradient as one chain of in-place scatter-adds into a single buffer. Autodiff's transpose makes
    one zero-filled [P, C] buffer per term and sums them (16 x 91 MB for P2-P5 at 800x1344), twice as slow.
    Like torchvision's, the op has no gradient w.r.t. the boxes (the sample weights)."""
    flat_features, indices, weights = residuals
    total = jnp.zeros_like(flat_features)
    for index, weight in zip(indices, weights):
        total = total.at[index].add(grad * weight[..., None].astype(grad.dtype), mode="promise_in_bounds")
    return total, None, None


_weighted_gather.defvjp(_weighted_gather_forward, _weighted_gather_backward)


def _argmax_dtype(num_samples):
    return jnp.int8 if num_samples <= 127 else jnp.int32


def _running_max(flat_features, indices, weights):
    """Max over samples s of sum_k flat_features[indices[s, k]] * weights[s, k]: one fused loop, no argmax."""
    best = None
    for s in range(indices.shape[0]):
        value = _sum_of_weighted_gathers(flat_features, indices[s], weights[s])
        best = value if best is None else jnp.where(value > best, value, best)
    return best


def _max_and_first_argmax(flat_features, indices, weights):
    """The max over the S samples and the first sample attaining it, as one reduction over a minor sample axis.

    The reduction's output, the argmax, is materialised once. Built from a chain of selects instead, it is cheap
    elementwise work that XLA copies into each of the S * 4 backward scatters, recomputing every sample there
    (forward + backward of 1000 RoIs 7x7 on P3: 2.9 s against 1.3 s), and copies that contract the sums into
    multiply-adds differently can break an exact tie differently and send a bin's cotangent twice
    (test_each_bin_sends_its_cotangent_once).
    """
    num_samples = indices.shape[0]
    values = [_sum_of_weighted_gathers(flat_features, indices[s], weights[s]) for s in range(num_samples)]
    values = jnp.stack(values, axis=-1)
    sample = jax.lax.broadcasted_iota(_argmax_dtype(num_samples), values.shape, values.ndim - 1)

    def larger_or_first(a, b):
        (a_value, a_sample), (b_value, b_sample) = a, b
        take_b = (b_value > a_value) | ((b_value == a_value) & (b_sample < a_sample))
        return jnp.where(take_b, b_value, a_value), jnp.where(take_b, b_sample, a_sample)

    init = (jnp.array(-jnp.inf, values.dtype), jnp.array(num_samples, sample.dtype))
    return jax.lax.reduce((values, sample), init, larger_or_first, (values.ndim - 1,))


@jax.custom_vjp
def _max_of_samples(flat_features, indices, weights):
    """[P, C], [S, 4, ...], [S, 4, ...] -> [..., C]: the largest of S bilinear samples (4 weighted neighbours
    each). The gradient goes to the 4 neighbours of the winning sample, the first one on ties."""
    return _running_max(flat_features, indices, weights)


def _max_of_samples_forward(flat_features, indices, weights):
    best, argmax = _max_and_first_argmax(flat_features, indices, weights)
    return best, (flat_features, indices, weights, argmax)


def _max_of_samples_backward(residuals, grad):
    """One chain of scatter-adds into one buffer, as `_weighted_gather_backward`: each sample sends the
    cotangent of the (bin, channel) pairs it won to its 4 neighbours. No gradient w.r.t. the boxes."""
    flat_features, indices, weights, argmax = residuals
    total = jnp.zeros_like(flat_features)
    zero = jnp.zeros((), grad.dtype)
    for s in range(indices.shape[0]):
        won = jnp.where(argmax == s, grad, zero)
        for index, weight in zip(indices[s], weights[s]):
            total = total.at[index].add(won * weight[..., None].astype(grad.dtype), mode="promise_in_bounds")
    return total, None, None


_max_of_samples.defvjp(_max_of_samples_forward, _max_of_samples_backward)


def roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned, roi_reduce="avg"):
    """RoIAlign with torchvision's semantics, NHWC.

    Args:
      features: [B, H, W, C].
      boxes: [B, N, 4] (x1, y1, x2, y2) in input-image pixels; box n of image b pools from features[b].
      output_size: int or (oh, ow).
      spatial_scale: feature pixels per input pixel (1 / stride).
      sampling_ratio: samples per bin along each axis, a static int >= 1.
      aligned: if True, shift box coordinates by -0.5 feature pixel (pixel centres at i + 0.5) and keep
        sub-pixel boxes; if False, the legacy Detectron behaviour (no shift, RoI size forced >= 1).
      roi_reduce: "avg" (torchvision's RoIAlign) or "max": the largest of the bin's sampling_ratio**2 bilinear
        samples (a sample outside the map counts as 0, as in the average). Its gradient goes to the 4 bilinear
        neighbours of the winning sample, the first in row-major sample order on ties. torchvision has no max
        mode; tests/test_roi_warp.py checks it against a NumPy reference.

    Returns:
      [B, N, oh, ow, C]; with "avg", equal to torchvision.ops.roi_align on the same boxes (NCHW, [K, 5] RoIs).
    """
    pool_image = functools.partial(
        _roi_align_flat,
        output_hw=_output_hw(output_size),
        sampling_ratio=_check_sampling_ratio(sampling_ratio),
        aligned=aligned,
        roi_reduce=_check_roi_reduce(roi_reduce),
    )
    return _pool_single_level(pool_image, features, boxes, spatial_scale)


def _pool_single_level(pool_image, features, boxes, spatial_scale):
    """pool_image(flat [H*W, C], boxes [N, 4], scale, height, width, offset) -> [N, ...] on each image of
    features [B, H, W, C] with boxes [B, N, 4]."""
    _, height, width, channels = features.shape
    flat = features.reshape(features.shape[0], height * width, channels)

    def one_image(image_features, image_boxes):
        return pool_image(image_features, image_boxes, spatial_scale, height, width, 0)

    return jax.vmap(one_image)(flat, boxes)


def fpn_level_for_boxes(
    boxes, min_level, max_level, canonical_scale=CANONICAL_SCALE, canonical_level=CANONICAL_LEVEL
):
    """FPN level of each box: floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6), clamped.

    Same float32 arithmetic as torchvision's LevelMapper. Boxes with zero, negative or NaN area go to
    `min_level` (torchvision leaves those undefined). Returns int32 levels in [min_level, max_level].
    """
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    size = jnp.sqrt(area)
    level = jnp.floor(canonical_level + jnp.log2(exact_divide(size, jnp.float32(canonical_scale))) + jnp.float32(LEVEL_EPS))
    level = jnp.where(jnp.isnan(level), min_level, level)
    return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def levels_from_strides(strides):
    """(min_level, max_level) of consecutive power-of-two strides such as (4, 8, 16, 32) -> (2, 5)."""
    levels = []
    for stride in strides:
        level = int(round(math.log2(stride)))
        if 2**level != stride:
            raise ValueError(f"strides must be powers of two, got {tuple(strides)}")
        levels.append(level)
    if levels != list(range(levels[0], levels[0] + len(levels))):
        raise ValueError(f"strides must be consecutive levels (each twice the previous), got {tuple(strides)}")
    return levels[0], levels[-1]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["flat"], meta_fields=["level_shapes", "strides"])
@dataclasses.dataclass(frozen=True)
class FlatPyramid:
    """FPN levels [B, H_l, W_l, C] concatenated once into ``flat`` [B, sum(H_l * W_l), C], finest first.

    Several RoI poolings of one pyramid (the box and mask heads) can share one copy, and its gradient, instead of
    concatenating the levels each time. A pytree whose level shapes and strides are static, so it passes through
    jit, vmap and lax.switch.
    """

    flat: jax.Array
    level_shapes: tuple  # ((H_l, W_l), ...)
    strides: tuple

    def tables(self):
        """(min_level, max_level, offsets, heights, widths, scales): NumPy arrays with one entry per level."""
        min_level, max_level = levels_from_strides(self.strides)
        heights = np.array([h for h, _ in self.level_shapes], np.int32)
        widths = np.array([w for _, w in self.level_shapes], np.int32)
        offsets = np.concatenate([[0], np.cumsum(heights * widths)[:-1]]).astype(np.int32)
        scales = np.array([1.0 / s for s in self.strides], np.float32)
        return min_level, max_level, offsets, heights, widths, scales


def flatten_pyramid(features, strides):
    """A list of per-level [B, H_l, W_l, C] maps (level l with stride strides[l]) as a FlatPyramid; a FlatPyramid
    is returned as it is (its strides must match)."""
    strides = tuple(int(s) for s in strides)
    if isinstance(features, FlatPyramid):
        if features.strides != strides:
            raise ValueError(f"the pyramid has strides {features.strides}, not {strides}")
        return features
    if len(features) != len(strides):
        raise ValueError(f"got {len(features)} feature maps but {len(strides)} strides")
    levels_from_strides(strides)
    batch, channels = features[0].shape[0], features[0].shape[-1]
    flat = jnp.concatenate([f.reshape(batch, -1, channels) for f in features], axis=1)
    return FlatPyramid(flat, tuple((int(f.shape[1]), int(f.shape[2])) for f in features), strides)


def multilevel_roi_align(features, boxes, output_size, strides, sampling_ratio, aligned, roi_reduce="avg"):
    """RoIAlign from an FPN pyramid: each box is pooled from the level its size selects.

    Args:
      features: list of [B, H_l, W_l, C], finest first; level l has stride strides[l]. Or the same levels as a
        FlatPyramid (flatten_pyramid), to share one flattened copy between several calls.
      boxes: [B, N, 4] in input-image pixels.
      output_size: int or (oh, ow).
      strides: consecutive powers of two, e.g. (4, 8, 16, 32) for P2-P5.
      sampling_ratio: static int >= 1.
      aligned: see `roi_align`.
      roi_reduce: "avg" or "max", see `roi_align`.

    Returns:
      [B, N, oh, ow, C]; with aligned=False and "avg" equal to torchvision's MultiScaleRoIAlign over the same
      levels. All levels are read by one fused gather from the flattened pyramid.
    """
    pool_image = functools.partial(
        _roi_align_flat,
        output_hw=_output_hw(output_size),
        sampling_ratio=_check_sampling_ratio(sampling_ratio),
        aligned=aligned,
        roi_reduce=_check_roi_reduce(roi_reduce),
    )
    return _pool_multilevel(pool_image, features, boxes, strides)


def _pool_multilevel(pool_image, features, boxes, strides):
    """pool_image(flat [P, C], boxes [N, 4], scale, height, width, offset) on each image of an FPN pyramid (a
    level list or FlatPyramid), each box on its `fpn_level_for_boxes` level: scale, height, width and offset
    are that level's, [N] arrays into the one flattened pyramid."""
    pyramid = flatten_pyramid(features, strides)
    min_level, max_level, offsets, heights, widths, scales = pyramid.tables()
    level_index = fpn_level_for_boxes(boxes, min_level, max_level) - min_level

    def one_image(image_features, image_boxes, image_levels):
        return pool_image(
            image_features,
            image_boxes,
            jnp.asarray(scales)[image_levels],
            jnp.asarray(heights)[image_levels],
            jnp.asarray(widths)[image_levels],
            jnp.asarray(offsets)[image_levels],
        )

    return jax.vmap(one_image)(pyramid.flat, boxes, level_index)
