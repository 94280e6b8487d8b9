"""Greedy non-maximum suppression with static output shapes, equal to torchvision.ops.nms.

The boxes are sorted by score and visited in blocks of `block_size`. For each block:

1. every candidate is tested against the boxes kept so far, one tile of 64 kept boxes at a time; the block
   moves on as soon as all its candidates are suppressed;
2. the greedy order inside the block is resolved with a fixed-point iteration on the block's upper-triangular
   "overlaps" matrix: `keep = alive & ~any(keep[i] & overlaps[i, j] for i < j)`. Entry j only depends on
   entries before it, so after k rounds the first k entries are final; the iteration stops at the first
   round that changes nothing, which is the unique fixed point, i.e. exactly the greedy answer;
3. the block's kept boxes are appended to a fixed-size buffer (a block with no survivors skips 2 and 3).

The loop stops once `max_output` boxes are kept, or at the first block of padding (invalid boxes rank last). The work is therefore about
(#boxes visited) x (#boxes kept) IoUs, computed as dense tiles, instead of torchvision's serial
(#boxes kept) x N scalar loop, and boxes past the `max_output`-th kept one are never looked at.

On a GPU each trip of a `while_loop` (and each `cond`) reads a predicate back to the host. The loops here make few
trips: on benchmarks/ops.py's 10,000 boxes, 32 in all for the RPN-like case keeping 1,000 (4 blocks, 24 kept-tile
trips, 4 fixed-point rounds), 129 keeping 2,000 and 89 under heavy overlap, plus one `cond` per block; under `vmap`
the loops run once for the batch and the `cond` becomes a select. An exact form with static trip counts has to
resolve each block's greedy order one candidate at a time (10,000 trips) against the whole kept buffer; measured
on a 2-core CPU it took 34-44 ms against 1.4-2.2 ms here, so the loops stay data-dependent.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DEFAULT_BLOCK_SIZE = 256
# Kept boxes are visited in tiles this long. Small tiles let a block stop early once all its candidates are
# suppressed (the common case under heavy overlap); the per-iteration overhead caps how small is useful.
_KEPT_TILE = 64


def nms(boxes, scores, iou_threshold, max_output, valid=None, block_size=DEFAULT_BLOCK_SIZE):
    """Greedy NMS: the boxes that `torchvision.ops.nms` keeps, in the same order, truncated to `max_output`.

    Args:
      boxes: [N, 4] (x1, y1, x2, y2).
      scores: [N]. Ties are broken by index (torchvision's CPU kernel uses a stable sort).
      iou_threshold: a box is suppressed by a kept, higher-ranked box when their IoU is strictly greater than
        this. A Python float is compared exactly as torchvision compares it (float32 IoU against a float64
        threshold); a traced value is compared in float32.
      max_output: static number of output slots.
      valid: optional [N] bool; boxes with False (e.g. padding) are never kept and never suppress anything.
      block_size: static tile size of the blocked suppression.

    Returns:
      indices: [max_output] int32 indices into `boxes`, in decreasing score order.
      valid: [max_output] bool; False marks unused slots, whose index is 0.
    """
    return _blocked_greedy_nms(boxes, scores, None, valid, iou_threshold, max_output, block_size)


def batched_nms(boxes, scores, classes, iou_threshold, max_output, valid=None, block_size=DEFAULT_BLOCK_SIZE):
    """Class-aware NMS: boxes only suppress boxes of the same class (`torchvision.ops.batched_nms`).

    Same arguments and outputs as `nms`, plus `classes`: [N] integer class ids. The kept indices are sorted by
    decreasing score over all classes, ties broken by index.
    """
    classes = jnp.asarray(classes)
    if not jnp.issubdtype(classes.dtype, jnp.integer):
        raise TypeError(f"classes must be integers, got {classes.dtype}")
    return _blocked_greedy_nms(boxes, scores, classes, valid, iou_threshold, max_output, block_size)


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


def _float32_threshold(iou_threshold):
    """The float32 threshold t32 with `iou > t32` <=> `iou > t64` for every float32 iou.

    torchvision compares the float32 IoU with a double threshold. Rounding the double to nearest could land
    above it (0.3 -> 0.30000001) and change the decision for an IoU equal to that float; rounding down cannot.
    """
    if isinstance(iou_threshold, (int, float, np.integer, np.floating)):
        threshold64 = float(iou_threshold)
        with np.errstate(over="ignore"):
            threshold32 = np.float32(threshold64)
        if float(threshold32) > threshold64:
            threshold32 = np.nextafter(threshold32, np.float32(-np.inf))
        return jnp.float32(threshold32)
    return jnp.asarray(iou_threshold, jnp.float32)


class _BoxColumns(NamedTuple):
    """A set of boxes stored column-wise, so every IoU operand is a contiguous vector."""

    x1: jax.Array
    y1: jax.Array
    x2: jax.Array
    y2: jax.Array
    area: jax.Array
    label: jax.Array | None  # class ids for class-aware NMS, None for plain NMS
    index: jax.Array  # position in the caller's `boxes`

    def slice(self, start, size):
        return jax.tree.map(lambda column: lax.dynamic_slice_in_dim(column, start, size), self)


def _box_columns(boxes, classes, index):
    x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
    # torchvision's formula, no "+1" and no clamping: degenerate boxes keep their (possibly negative) area.
    area = (x2 - x1) * (y2 - y1)
    return _BoxColumns(x1, y1, x2, y2, area, classes, index)


def _overlap_exceeds(rows, columns, threshold):
    """[A] x [B] -> [A, B] bool: IoU > threshold (and same class), computed op by op like torchvision's CPU kernel.

    The areas come in precomputed (materialized outside the loop that calls this), so the compiler cannot fuse
    an area product into the sum below as an FMA; an FMA rounds differently and would flip decisions at the
    threshold.
    """
    width = jnp.maximum(
        jnp.minimum(rows.x2[:, None], columns.x2[None, :]) - jnp.maximum(rows.x1[:, None], columns.x1[None, :]), 0.0
    )
    height = jnp.maximum(
        jnp.minimum(rows.y2[:, None], columns.y2[None, :]) - jnp.maximum(rows.y1[:, None], columns.y1[None, :]), 0.0
    )
    # Exact (width, height >= 0), and it stops `union - width * height` from becoming an FMA.
    intersection = jnp.maximum(width * height, 0.0)
    union = (rows.area[:, None] + columns.area[None, :]) - intersection
    # Two empty boxes give 0 / 0 = NaN, which is never > threshold: they do not suppress each other.
    exceeds = intersection / union > threshold
    if rows.label is not None:
        exceeds &= rows.label[:, None] == columns.label[None, :]
    return exceeds


def _rank_order(scores, valid):
    """Indices that sort the boxes like torchvision's stable descending sort, with invalid boxes last.

    In torch's descending sort NaN counts as the largest score, and -0.0 ties with 0.0.
    """
    num_boxes = scores.shape[0]
    bits = lax.bitcast_convert_type(jnp.where(scores == 0, 0.0, scores), jnp.int32)
    # Flipping the magnitude bits of negative floats makes the int32 order equal the float order; `~` reverses
    # it and stays inside (int32 min, int32 max), which are left for NaN scores and invalid boxes.
    descending = ~jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = jnp.where(valid, jnp.where(jnp.isnan(scores), jnp.iinfo(jnp.int32).min, descending), jnp.iinfo(jnp.int32).max)
    if num_boxes > 2**16:
        return lax.sort((key, lax.iota(jnp.int32, num_boxes)), num_keys=1, is_stable=True)[1]
    # XLA's CPU sort is several times faster for one 32-bit operand than for a (key, index) pair. So sort by the
    # key 16 bits at a time (least significant half first), each pass packing (half key, position) into one
    # uint32: ties within a pass keep the previous order, which makes the two passes a stable sort by key.
    unsigned_key = lax.bitcast_convert_type(key, jnp.uint32) ^ jnp.uint32(0x80000000)
    position = lax.iota(jnp.uint32, num_boxes)
    by_low_half = lax.sort((unsigned_key << 16) | position) & 0xFFFF
    by_key = lax.sort((unsigned_key[by_low_half] >> 16 << 16) | position) & 0xFFFF
    return by_low_half[by_key].astype(jnp.int32)


def _blocked_greedy_nms(boxes, scores, classes, valid, iou_threshold, max_output, block_size):
    if not isinstance(max_output, (int, np.integer)) or max_output < 0:
        raise ValueError(f"max_output must be a static non-negative int, got {max_output!r}")
    max_output = int(max_output)
    # Indices carry no gradient; stopping it here also keeps reverse-mode autodiff out of the while loops.
    boxes = lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
    scores = lax.stop_gradient(jnp.asarray(scores, jnp.float32))
    num_boxes = boxes.shape[0]
    if boxes.shape != (num_boxes, 4) or scores.shape != (num_boxes,):
        raise ValueError(f"expected boxes [N, 4] and scores [N], got {boxes.shape} and {scores.shape}")
    if num_boxes == 0 or max_output == 0:
        return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)
    valid = jnp.ones((num_boxes,), bool) if valid is None else jnp.asarray(valid, bool)
    threshold = _float32_threshold(iou_threshold)

    block = min(block_size, _round_up(num_boxes, 8))
    num_blocks = math.ceil(num_boxes / block)
    padded = num_blocks * block
    tile = min(_KEPT_TILE, block)
    # Kept boxes never exceed min(max_output, N) before the loop stops; whole tiles keep slicing in bounds.
    capacity = _round_up(min(max_output, num_boxes), tile)

    order = _rank_order(scores, valid)

    def pad(column):
        return jnp.pad(column, (0, padded - num_boxes))

    ranked = jax.tree.map(pad, _box_columns(boxes[order], None if classes is None else classes[order], order))
    ranked_valid = pad(valid[order])

    def survivors_of_kept(candidates, alive, count, kept):
        """Drop the candidates that an already-kept box overlaps; visits only the filled kept tiles."""
        num_tiles = (count + tile - 1) // tile

        def cond(state):
            tile_index, alive = state
            return (tile_index < num_tiles) & jnp.any(alive)

        def body(state):
            tile_index, alive = state
            start = tile_index * tile
            # [tile, block], reduced over the leading axis: an elementwise OR of rows, which vectorizes well.
            hits = _overlap_exceeds(kept.slice(start, tile), candidates, threshold)
            hits &= (start + jnp.arange(tile) < count)[:, None]
            return tile_index + 1, alive & ~jnp.any(hits, axis=0)

        return lax.while_loop(cond, body, (jnp.int32(0), alive))[1]

    def greedy_within_block(candidates, alive):
        position = jnp.arange(block)
        overlaps = _overlap_exceeds(candidates, candidates, threshold) & (position[:, None] < position[None, :])

        def body(state):
            keep, _ = state
            new_keep = alive & ~jnp.any(overlaps & keep[:, None], axis=0)
            return new_keep, jnp.any(new_keep != keep)

        return lax.while_loop(lambda state: state[1], body, (alive, jnp.bool_(True)))[0]

    def process_block(state):
        block_index, count, kept = state
        start = block_index * block
        candidates = ranked.slice(start, block)
        alive = survivors_of_kept(candidates, lax.dynamic_slice_in_dim(ranked_valid, start, block), count, kept)

        def keep_and_append(count, kept):
            keep = greedy_within_block(candidates, alive)
            # Append in order; slots past the buffer (beyond max_output) are dropped.
            slot = jnp.where(keep, count + jnp.cumsum(keep) - 1, capacity)
            kept = jax.tree.map(lambda buffer, new: buffer.at[slot].set(new, mode="drop"), kept, candidates)
            return count + jnp.sum(keep, dtype=jnp.int32), kept

        # Most blocks die entirely under heavy overlap; skip their within-block work and the appends.
        count, kept = lax.cond(jnp.any(alive), keep_and_append, lambda count, kept: (count, kept), count, kept)
        return block_index + 1, count, kept

    def more_to_do(state):
        block_index, count, _ = state
        # Invalid boxes are ranked last: a block that starts with one holds nothing to keep.
        next_block_has_boxes = ranked_valid[jnp.minimum(block_index, num_blocks - 1) * block]
        return (block_index < num_blocks) & (count < max_output) & next_block_has_boxes

    empty_kept = jax.tree.map(lambda column: jnp.zeros((capacity,), column.dtype), ranked)
    _, count, kept = lax.while_loop(more_to_do, process_block, (jnp.int32(0), jnp.int32(0), empty_kept))

    kept_index = kept.index
    if capacity < max_output:
        kept_index = jnp.pad(kept_index, (0, max_output - capacity))
    # Slots at or past `count` were never written and still hold index 0.
    return kept_index[:max_output], jnp.arange(max_output) < count
