"""Region Proposal Network: the shared head, its training targets and losses, and proposal generation.

The head is a Flax module (parameters and wiring). Targets, losses and proposals are plain functions that
compose ops/ under static shapes: every image yields exactly `post_nms_topk` proposal slots with a validity mask.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax import ops
from maskrcnn_jax.layers.activation import bit_mask_relu
from maskrcnn_jax.layers.conv import Conv

# torchvision RPNHead / detectron2 StandardRPNHead init.
head_init = nn.initializers.normal(stddev=0.01)


def anchors_per_location(strides, sizes, aspect_ratios) -> int:
    """Anchors at each feature position: one size per level (FPN: 3), or every size on a single level (C4 and
    C5: 5 sizes x 3 ratios = 15)."""
    sizes_per_level = len(sizes) if len(strides) == 1 else 1
    return sizes_per_level * len(aspect_ratios)


def level_anchors(image_size, strides, sizes, aspect_ratios):
    """One [H_l * W_l * A, 4] array of anchors per level, in the order RPNHead lays out its outputs.

    With one stride and several sizes (the C4 and C5 backbones) all sizes share the level: location-major, then
    size, then aspect ratio, as detectron2's DefaultAnchorGenerator orders a cell's anchors (its C4 RPN weights
    expect that order). Otherwise ops.generate_anchors' one size per level.
    """
    if len(strides) == 1 and len(sizes) > 1:
        per_size = [ops.generate_anchors(image_size, strides, (size,), aspect_ratios)[0] for size in sizes]
        grid = [anchors.reshape(-1, 1, len(aspect_ratios), 4) for anchors in per_size]
        return [jnp.concatenate(grid, axis=1).reshape(-1, 4)]
    return ops.generate_anchors(image_size, strides, sizes, aspect_ratios)


class RPNHead(nn.Module):
    """A 3x3 conv shared by all levels, then per-anchor objectness logits and box deltas.

    Variable names mirror torchvision's `rpn.head`: `conv`, `cls_logits`, `bbox_pred`.
    """

    num_anchors: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]):
        """features: per level [B, H, W, C]. Returns objectness [B, sum HWA] and deltas [B, sum HWA, 4] (float32)."""
        conv_options = dict(kernel_init=head_init, dtype=self.dtype)
        conv = Conv(features[0].shape[-1], (3, 3), padding=1, name="conv", **conv_options)
        cls_logits = Conv(self.num_anchors, (1, 1), name="cls_logits", **conv_options)
        bbox_pred = Conv(4 * self.num_anchors, (1, 1), name="bbox_pred", **conv_options)
        logits, deltas = [], []
        for feature in features:
            hidden = bit_mask_relu(conv(feature))
            batch = feature.shape[0]
            # Anchor order is location-major then anchor, as ops.generate_anchors lays them out.
            logits.append(cls_logits(hidden).reshape(batch, -1))
            deltas.append(bbox_pred(hidden).reshape(batch, -1, 4))
        return (
            jnp.concatenate(logits, axis=1).astype(jnp.float32),
            jnp.concatenate(deltas, axis=1).astype(jnp.float32),
        )


def rpn_losses(
    key,
    objectness,
    deltas,
    anchors,
    gt_boxes,
    gt_valid,
    gt_is_crowd,
    *,
    iou_thresholds=(0.3, 0.7),
    batch_size_per_image=256,
    positive_fraction=0.5,
    box_loss_beta=0.0,
    crowd_ioa_threshold=0.7,
):
    """detectron2's RPN losses: BCE on sampled anchors and smooth-L1 (L1 at beta=0) on sampled positives,
    both summed and divided by `num_images * batch_size_per_image`. Anchors lying at least `crowd_ioa_threshold`
    inside a crowd region are ignored (None: crowd regions are dropped, as detectron2 and torchvision do).

    objectness [B, A], deltas [B, A, 4], anchors [A, 4]; gt_* padded [B, G, ...] with validity.
    """
    batch = objectness.shape[0]
    keys = jax.random.split(key, batch)
    anchors = jnp.asarray(anchors)  # a NumPy array cannot be indexed by the traced sample

    def per_image(key, objectness, deltas, gt_boxes, gt_valid, gt_is_crowd):
        matched, labels = ops.match_boxes(
            gt_boxes,
            gt_valid,
            gt_is_crowd,
            anchors,
            low_threshold=iou_thresholds[0],
            high_threshold=iou_thresholds[1],
            allow_low_quality_matches=True,
            crowd_ioa_threshold=crowd_ioa_threshold,
        )
        index, sampled, positive = ops.sample_balanced(key, labels, batch_size_per_image, positive_fraction)
        target_boxes = gt_boxes[matched[index]]
        target_deltas = ops.encode_matched_boxes(target_boxes, anchors[index], positive)
        cls_loss = ops.sigmoid_binary_cross_entropy(
            objectness[index], positive.astype(jnp.float32), sampled, normalizer=1
        )
        box_loss = ops.smooth_l1_loss(deltas[index], target_deltas, box_loss_beta, positive, normalizer=1)
        return cls_loss, box_loss

    cls_loss, box_loss = jax.vmap(per_image)(keys, objectness, deltas, gt_boxes, gt_valid, gt_is_crowd)
    normalizer = batch * batch_size_per_image
    return {"rpn_cls": cls_loss.sum() / normalizer, "rpn_box": box_loss.sum() / normalizer}


def propose(
    objectness,
    deltas,
    anchors_per_level,
    image_sizes,
    *,
    pre_nms_topk,
    post_nms_topk,
    nms_threshold=0.7,
    min_size=1e-3,
):
    """Proposals per image: top-k per level, decode, clip, drop small boxes, per-level NMS, top-k overall.

    objectness [B, A], deltas [B, A, 4]; anchors_per_level a list of [A_l, 4]; image_sizes [B, 2] (h, w) of the
    unpadded image inside the canvas. Returns boxes [B, post_nms_topk, 4], scores (probabilities) and a validity
    mask, all without gradient (as in the paper).
    """
    level_sizes = [a.shape[0] for a in anchors_per_level]
    anchors = jnp.concatenate(anchors_per_level, axis=0)

    def per_image(objectness, deltas, image_size):
        indices, levels = [], []
        start = 0
        for level, size in enumerate(level_sizes):
            k = min(pre_nms_topk, size)
            _, top = jax.lax.top_k(objectness[start : start + size], k)
            indices.append(top + start)
            levels.append(jnp.full((k,), level, jnp.int32))
            start += size
        indices = jnp.concatenate(indices)
        levels = jnp.concatenate(levels)
        boxes = ops.decode_boxes(deltas[indices], anchors[indices])
        boxes = ops.clip_boxes(boxes, image_size[0], image_size[1])
        scores = jax.nn.sigmoid(objectness[indices])
        valid = ops.min_size_mask(boxes, min_size) & jnp.isfinite(scores)
        keep, keep_valid = ops.batched_nms(
            boxes, scores, levels, nms_threshold, post_nms_topk, valid=valid
        )
        return boxes[keep], jnp.where(keep_valid, scores[keep], 0.0), keep_valid

    boxes, scores, valid = jax.vmap(per_image)(objectness, deltas, image_sizes)
    return jax.lax.stop_gradient(boxes), jax.lax.stop_gradient(scores), valid
