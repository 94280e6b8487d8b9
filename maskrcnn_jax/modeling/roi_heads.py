"""RoI heads' arithmetic: RoI sampling for training, the box head's losses, and detection (the head modules are in
heads.py).

Label convention: `num_classes` counts the background, as torchvision does (91 for COCO); label 0 is background,
1..num_classes-1 are objects. Class logits, box deltas and mask logits all have `num_classes` slots, so a label
indexes them directly (the background slots of the box and mask outputs are never trained).
"""

import jax
import jax.numpy as jnp

from maskrcnn_jax import ops

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)

def sample_rois(
    key,
    proposals,
    proposal_valid,
    gt_boxes,
    gt_classes,
    gt_valid,
    gt_is_crowd,
    *,
    batch_size_per_image=512,
    positive_fraction=0.25,
    iou_threshold=0.5,
    crowd_ioa_threshold=0.7,
):
    """Training RoIs per image: proposals plus the ground-truth boxes, matched at `iou_threshold` (proposals lying at
    least `crowd_ioa_threshold` inside a crowd region ignored; None drops crowd regions), then a balanced sample.
    Positives come first, so the first `int(batch_size_per_image * positive_fraction)` slots hold every positive
    (the mask head's fixed-size input).

    Returns a dict of [B, S, ...] arrays: rois, valid, positive, classes (0 for background), matched_gt.
    """
    batch = proposals.shape[0]
    keys = jax.random.split(key, batch)

    def per_image(key, proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, gt_is_crowd):
        candidates = jnp.concatenate([proposals, gt_boxes], axis=0)
        candidate_valid = jnp.concatenate([proposal_valid, gt_valid & ~gt_is_crowd], axis=0)
        matched, labels = ops.match_boxes(
            gt_boxes,
            gt_valid,
            gt_is_crowd,
            candidates,
            low_threshold=iou_threshold,
            high_threshold=iou_threshold,
            allow_low_quality_matches=False,
            crowd_ioa_threshold=crowd_ioa_threshold,
        )
        labels = jnp.where(candidate_valid, labels, -1)
        index, valid, positive = ops.sample_balanced(key, labels, batch_size_per_image, positive_fraction)
        matched = matched[index]
        classes = jnp.where(positive, gt_classes[matched], 0)
        return {
            "rois": candidates[index],
            "valid": valid,
            "positive": positive,
            "classes": classes,
            "matched_gt": matched,
        }

    sampled = jax.vmap(per_image)(keys, proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, gt_is_crowd)
    return jax.tree.map(jax.lax.stop_gradient, sampled)


def box_head_losses(class_logits, box_deltas, sampled, gt_boxes, *, box_loss_beta=0.0):
    """detectron2's FastRCNNOutputLayers losses: cross-entropy averaged over sampled RoIs; smooth-L1 on the
    ground-truth class's deltas of positives, summed and divided by the number of sampled RoIs."""
    valid, positive, classes = sampled["valid"], sampled["positive"], sampled["classes"]
    target_boxes = jnp.take_along_axis(gt_boxes, sampled["matched_gt"][..., None], axis=1)
    target_deltas = ops.encode_matched_boxes(target_boxes, sampled["rois"], positive, BOX_WEIGHTS)
    class_deltas = jnp.take_along_axis(box_deltas, classes[..., None, None], axis=-2)[..., 0, :]
    box_loss = ops.smooth_l1_loss(class_deltas, target_deltas, box_loss_beta, positive, normalizer=valid.sum())
    return {"box_cls": ops.softmax_cross_entropy(class_logits, classes, valid), "box_reg": box_loss}


def detect(
    class_logits,
    box_deltas,
    proposals,
    proposal_valid,
    image_size,
    *,
    score_threshold=0.05,
    nms_threshold=0.5,
    detections_per_image=100,
    pre_nms_topk=5000,
    min_size=1e-2,
):
    """torchvision's postprocess_detections for one image, with static shapes.

    Every (proposal, object class) pair is a candidate: softmax score, class-specific box, clipped to the
    image. Candidates above `score_threshold` and at least `min_size` wide enter class-aware NMS; the
    `pre_nms_topk` highest are kept before it so the NMS input has a fixed size.
    Returns boxes [D, 4], scores [D], classes [D] (1..num_classes-1) and valid [D].
    """
    num_rois, num_classes = class_logits.shape
    scores = jax.nn.softmax(class_logits, axis=-1)[:, 1:]
    boxes = ops.decode_boxes(box_deltas[:, 1:], jnp.broadcast_to(proposals[:, None], (num_rois, num_classes - 1, 4)),
                             BOX_WEIGHTS)
    boxes = ops.clip_boxes(boxes, image_size[0], image_size[1]).reshape(-1, 4)
    classes = jnp.broadcast_to(jnp.arange(1, num_classes), (num_rois, num_classes - 1)).reshape(-1)
    candidate_valid = (
        (scores > score_threshold) & proposal_valid[:, None]
    ).reshape(-1) & ops.min_size_mask(boxes, min_size)
    scores = jnp.where(candidate_valid, scores.reshape(-1), -1.0)
    top_scores, top = jax.lax.top_k(scores, min(pre_nms_topk, scores.shape[0]))
    keep, keep_valid = ops.batched_nms(
        boxes[top], top_scores, classes[top], nms_threshold, detections_per_image, valid=top_scores > -1.0
    )
    index = top[keep]
    return (
        jnp.where(keep_valid[:, None], boxes[index], 0.0),
        jnp.where(keep_valid, scores[index], 0.0),
        jnp.where(keep_valid, classes[index], 0),
        keep_valid,
    )
