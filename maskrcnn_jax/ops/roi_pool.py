"""RoIPool (Fast R-CNN): quantized max pooling of each box into a fixed grid, NHWC, single- and multi-level.

The numbers follow `torchvision.ops.roi_pool` exactly: box corners are scaled and rounded half away from zero,
the RoI is at least 1 x 1 cell, bin b of n covers cells [floor(b * size / n), ceil((b + 1) * size / n)) from the
RoI start, clipped to the map, and an empty bin gives 0. The gradient goes to the first maximal cell of each bin
in row-major order (torchvision's argmax).

Bins have data-dependent sizes, so the max over a bin comes from a 2-D sparse table: level (ky, kx) holds, for
every cell, the max and argmax over the 2**ky x 2**kx window starting there. Any rectangle is the union of four
(overlapping) windows of one level, so each bin costs four gathers of C-vectors whatever its size. The table
takes about log2(H) * log2(W) times the memory of the channels it covers, so it is built for a chunk of
channels at a time.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from maskrcnn_jax.ops.roi_align import _output_hw, exact_divide, flatten_pyramid, fpn_level_for_boxes


def _num_window_levels(size):
    """Window sizes 1, 2, 4, ... up to `size`: a clipped bin is never longer than the map."""
    return int(size).bit_length()


class _TableLayout:
    """Static layout of the sparse tables of several maps, all flattened into one [T, C] array.

    Level (ky, kx) of map l is a row-major [H_l - 2**ky + 1, W_l - 2**kx + 1] block starting at
    `offsets[l, ky, kx]`; `row_lengths[l, kx]` is its width.
    """

    def __init__(self, heights, widths):
        num_maps = len(heights)
        self.levels_y = max(_num_window_levels(h) for h in heights)
        self.levels_x = max(_num_window_levels(w) for w in widths)
        self.offsets = np.zeros((num_maps, self.levels_y, self.levels_x), np.int32)
        self.row_lengths = np.ones((num_maps, self.levels_x), np.int32)
        total = 0
        for m, (h, w) in enumerate(zip(heights, widths)):
            for ky in range(_num_window_levels(h)):
                for kx in range(_num_window_levels(w)):
                    self.offsets[m, ky, kx] = total
                    self.row_lengths[m, kx] = w - 2**kx + 1
                    total += (h - 2**ky + 1) * (w - 2**kx + 1)
        self.total = total


def _take_larger(a, b):
    """Elementwise max of (values,) or (values, argmax) tuples.

    With argmax, equal values keep the smaller flat index: the first maximal cell in row-major order.
    """
    if len(a) == 1:
        return (jnp.maximum(a[0], b[0]),)
    a_value, a_index = a
    b_value, b_index = b
    take_b = (b_value > a_value) | ((b_value == a_value) & (b_index < a_index))
    return jnp.where(take_b, b_value, a_value), jnp.where(take_b, b_index, a_index)


def _sparse_table(feature_map, base_index, with_argmax):
    """All window levels of one [H, W, C] map, flattened in `_TableLayout` order.

    Returns ([t, C] values,) or, with_argmax, ([t, C] values, [t, C] argmax) where argmax entries are flat
    indices `base_index + h * W + w` into the flattened feature maps.
    """
    height, width, channels = feature_map.shape
    column = (feature_map,)
    if with_argmax:
        cell_index = base_index + jnp.arange(height * width, dtype=jnp.int32).reshape(height, width, 1)
        column += (jnp.broadcast_to(cell_index, feature_map.shape),)
    levels = []
    for ky in range(_num_window_levels(height)):
        if ky:
            half = 2 ** (ky - 1)
            column = _take_larger(tuple(t[:-half] for t in column), tuple(t[half:] for t in column))
        level = column
        for kx in range(_num_window_levels(width)):
            if kx:
                half = 2 ** (kx - 1)
                level = _take_larger(tuple(t[:, :-half] for t in level), tuple(t[:, half:] for t in level))
            levels.append(tuple(t.reshape(-1, channels) for t in level))
    return tuple(jnp.concatenate(planes) for planes in zip(*levels))


def _round_half_away_from_zero(x):
    """C's round(): jnp.round rounds halves to even."""
    truncated = jnp.trunc(x)
    is_half = jnp.abs(x - truncated) == 0.5
    return jnp.where(is_half, truncated + jnp.sign(x), jnp.round(x))


def quantized_rois(boxes, scale):
    """RoIPool's quantization of [N, 4] boxes: (y1, x1, roi_h, roi_w), [N] int32 each, in feature cells.

    Corners are `boxes * scale` rounded half away from zero (torchvision's C round()); the RoI covers cells
    y1 .. y1 + roi_h - 1 and x1 .. x1 + roi_w - 1, at least one cell each way. `scale` is a scalar or [N].
    RoIWarp samples the same cells.
    """
    scale = jnp.asarray(scale, jnp.float32)
    scaled = boxes * scale[..., None]
    corners = _round_half_away_from_zero(scaled).astype(jnp.int32)
    x1, y1, x2, y2 = corners[:, 0], corners[:, 1], corners[:, 2], corners[:, 3]
    # Malformed RoIs are forced to 1 x 1, as in torchvision.
    roi_w = jnp.maximum(x2 - x1 + 1, 1)
    roi_h = jnp.maximum(y2 - y1 + 1, 1)
    return y1, x1, roi_h, roi_w


def _bin_edges(start, length, num_bins, size):
    """Clipped [begin, end) cells of every bin along one axis: [N, num_bins] int32 each."""
    bin_size = exact_divide(length.astype(jnp.float32), jnp.float32(num_bins))[:, None]
    bins = jnp.arange(num_bins, dtype=jnp.float32)
    begin = jnp.floor(bins * bin_size).astype(jnp.int32) + start[:, None]
    end = jnp.ceil((bins + 1.0) * bin_size).astype(jnp.int32) + start[:, None]
    return jnp.clip(begin, 0, size[:, None]), jnp.clip(end, 0, size[:, None])


def _floor_log2(n):
    """floor(log2(n)) of positive int32 values, exactly."""
    return 31 - lax.clz(n)


def _pool_bins(table, layout, boxes, map_index, scale, heights, widths, output_hw):
    """Max (and argmax, if the table has it) of every bin of every box of one image, as a tuple of
    [N, oh, ow, C] arrays. Empty bins give value 0 and argmax -1."""
    oh, ow = output_hw
    y1, x1, roi_h, roi_w = quantized_rois(boxes, scale)
    y_begin, y_end = _bin_edges(y1, roi_h, oh, heights)
    x_begin, x_end = _bin_edges(x1, roi_w, ow, widths)

    y_len = (y_end - y_begin)[:, :, None]
    x_len = (x_end - x_begin)[:, None, :]
    empty = (y_len <= 0) | (x_len <= 0)
    ky = _floor_log2(jnp.maximum(y_len, 1))
    kx = _floor_log2(jnp.maximum(x_len, 1))
    # Two windows per axis: one anchored at the bin's start, one ending at its end.
    rows = (y_begin[:, :, None], jnp.maximum(y_end[:, :, None] - (1 << ky), 0))
    cols = (x_begin[:, None, :], jnp.maximum(x_end[:, None, :] - (1 << kx), 0))
    map_index = map_index[:, None, None]
    level_offset = jnp.asarray(layout.offsets)[map_index, ky, kx]
    row_length = jnp.asarray(layout.row_lengths)[map_index, kx]

    best = None
    for row in rows:
        for col in cols:
            position = level_offset + row * row_length + col
            candidate = tuple(plane.at[position].get(mode="clip") for plane in table)
            best = candidate if best is None else _take_larger(best, candidate)
    empty = empty[..., None]
    value = jnp.where(empty, jnp.zeros_like(best[0]), best[0])
    if len(best) == 1:
        return (value,)
    return value, jnp.where(empty, -1, best[1])


# Channels per pass over the sparse table. The table of all C channels is ~log2(H) * log2(W) copies of the map
# (650 MB for 100x168x256); built 16 channels at a time it stays in cache: 2x faster at that size.
CHANNEL_CHUNK = 16


def _channel_chunk(channels):
    return max(d for d in range(1, min(channels, CHANNEL_CHUNK) + 1) if channels % d == 0)


def _pool_image_impl(layout_key, output_hw, flat_features, boxes, map_index, scale, with_argmax):
    """Pools channel chunks one after another (lax.map) and puts the channels back together."""
    num_cells, channels = flat_features.shape
    chunk = _channel_chunk(channels)
    chunks = flat_features.reshape(num_cells, channels // chunk, chunk).transpose(1, 0, 2)
    pooled = lax.map(
        lambda features: _pool_channels(layout_key, output_hw, features, boxes, map_index, scale, with_argmax),
        chunks,
    )
    # [num_chunks, N, oh, ow, chunk] -> [N, oh, ow, C]
    return tuple(jnp.moveaxis(p, 0, -2).reshape(*p.shape[1:-1], channels) for p in pooled)


def _pool_channels(layout_key, output_hw, flat_features, boxes, map_index, scale, with_argmax):
    heights, widths = layout_key
    layout = _TableLayout(heights, widths)
    tables, start = [], 0
    for h, w in zip(heights, widths):
        tables.append(_sparse_table(flat_features[start : start + h * w].reshape(h, w, -1), start, with_argmax))
        start += h * w
    table = tuple(jnp.concatenate(planes) for planes in zip(*tables))
    box_heights = jnp.asarray(np.array(heights, np.int32))[map_index]
    box_widths = jnp.asarray(np.array(widths, np.int32))[map_index]
    boxes = lax.stop_gradient(boxes)
    return _pool_bins(table, layout, boxes, map_index, scale, box_heights, box_widths, output_hw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _pool_image(layout_key, output_hw, flat_features, boxes, map_index, scale):
    """RoIPool of one image's flattened maps [P, C]; the custom VJP routes gradients through the argmax.

    Without differentiation no argmax table is built, which halves the table's memory traffic.
    """
    (value,) = _pool_image_impl(layout_key, output_hw, flat_features, boxes, map_index, scale, False)
    return value


def _pool_image_fwd(layout_key, output_hw, flat_features, boxes, map_index, scale):
    value, argmax = _pool_image_impl(layout_key, output_hw, flat_features, boxes, map_index, scale, True)
    return value, (argmax, boxes, map_index, scale)


def _pool_image_bwd(layout_key, output_hw, residuals, grad):
    argmax, boxes, map_index, scale = residuals
    heights, widths = layout_key
    num_cells = sum(h * w for h, w in zip(heights, widths))
    channels = grad.shape[-1]
    # Each (bin, channel) sends its gradient to its own argmax cell; empty bins (argmax -1) send nothing.
    # (JAX wraps negative indices, so the dropped sentinel is one past the end.)
    flat_target = jnp.where(
        argmax >= 0, argmax * channels + jnp.arange(channels, dtype=jnp.int32), num_cells * channels
    )
    flat_grad = jnp.zeros((num_cells * channels,), grad.dtype)
    flat_grad = flat_grad.at[flat_target.reshape(-1)].add(grad.reshape(-1), mode="drop")
    return (
        flat_grad.reshape(num_cells, channels),
        jnp.zeros_like(boxes),
        np.zeros(map_index.shape, jax.dtypes.float0),
        jnp.zeros_like(scale),
    )


_pool_image.defvjp(_pool_image_fwd, _pool_image_bwd)


def _pool(flat, boxes, map_index, scales, heights, widths, output_size):
    """Shared driver: flat [B, P, C] pyramid, boxes [B, N, 4], map_index [B, N] -> [B, N, oh, ow, C]."""
    output_hw = _output_hw(output_size)
    layout_key = (tuple(int(h) for h in heights), tuple(int(w) for w in widths))
    scale = jnp.asarray(scales, jnp.float32)[map_index]

    def one_image(image_flat, image_boxes, image_map_index, image_scale):
        return _pool_image(layout_key, output_hw, image_flat, image_boxes, image_map_index, image_scale)

    return jax.vmap(one_image)(flat, boxes, map_index.astype(jnp.int32), scale)


def roi_pool(features, boxes, output_size, spatial_scale):
    """RoIPool with torchvision's semantics, NHWC.

    Args:
      features: [B, H, W, C].
      boxes: [B, N, 4] (x1, y1, x2, y2) in input-image pixels; box n of image b pools from features[b].
      output_size: int or (oh, ow).
      spatial_scale: feature cells per input pixel (1 / stride).

    Returns:
      [B, N, oh, ow, C], equal to torchvision.ops.roi_pool; differentiable with respect to `features`.
    """
    batch, height, width, channels = features.shape
    flat = features.reshape(batch, height * width, channels)
    map_index = jnp.zeros(boxes.shape[:2], jnp.int32)
    return _pool(flat, boxes, map_index, [spatial_scale], [height], [width], output_size)


def multilevel_roi_pool(features, boxes, output_size, strides):
    """RoIPool from an FPN pyramid, each box on the level `fpn_level_for_boxes` assigns (as multilevel_roi_align).

    Args:
      features: list of [B, H_l, W_l, C], finest first, with consecutive power-of-two `strides`, or a FlatPyramid.
      boxes: [B, N, 4] in input-image pixels.
      output_size: int or (oh, ow).
      strides: e.g. (4, 8, 16, 32).

    Returns:
      [B, N, oh, ow, C]; for each box, torchvision.ops.roi_pool on its own level with spatial_scale 1 / stride.
    """
    pyramid = flatten_pyramid(features, strides)
    min_level, max_level, _, heights, widths, scales = pyramid.tables()
    level_index = fpn_level_for_boxes(boxes, min_level, max_level) - min_level
    return _pool(pyramid.flat, boxes, level_index, scales, heights, widths, output_size)
