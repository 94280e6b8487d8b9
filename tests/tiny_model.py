"""The tiny Mask R-CNN (ResNet-18-GN, 64-channel FPN, few RoIs) and the drawn one-image examples that the model-level
tests share: boxes and ellipses of two classes on a 128 x 128 canvas, with box-cropped masks."""

import numpy as np

from maskrcnn_jax import ops
from maskrcnn_jax.modeling.defaults import model_config

CANVAS = (128, 128)
MAX_INSTANCES = 4
CROP_SIZE = 56


def tiny_config():
    c = model_config()
    c.num_classes = 3
    c.backbone.depth = 18
    c.backbone.norm = "gn"
    c.backbone.freeze_at = 0
    c.backbone.fpn_channels = 64
    c.anchors.sizes = (16, 32, 64, 128, 256)
    c.rpn.pre_nms_topk_train = c.rpn.pre_nms_topk_test = 300
    c.rpn.post_nms_topk_train = c.rpn.post_nms_topk_test = 100
    c.roi_heads.batch_size_per_image = 64
    c.roi_heads.fc_dim = 256
    c.roi_heads.mask_conv_dim = 64
    # Two RoI buckets keep the mask head inside the training switch, as by default, at half the branches to compile.
    c.roi_heads.mask_roi_buckets = 2
    c.detection.detections_per_image = 20
    c.detection.pre_nms_topk = 500
    return c


def draw_instances(shapes):
    """shapes: (class, kind, x1, y1, x2, y2) -> full masks [G, H, W] and the masks' tight boxes."""
    yy, xx = np.mgrid[0 : CANVAS[0], 0 : CANVAS[1]] + 0.5
    masks = []
    for _, kind, x1, y1, x2, y2 in shapes:
        if kind == "box":
            mask = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
        else:
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        masks.append(mask)
    masks = np.stack(masks) if masks else np.zeros((0, *CANVAS), bool)
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return masks, np.asarray(boxes, np.float32).reshape(-1, 4)


def make_example(shapes, rng, crowd=()):
    masks, boxes = draw_instances(shapes)
    image = rng.normal(0, 0.2, (*CANVAS, 3)).astype(np.float32)
    colours = {1: (1.5, -1.0, -1.0), 2: (-1.0, 1.5, -1.0)}
    for (label, *_), mask in zip(shapes, masks):
        image[mask] = colours[label]
    count = len(shapes)
    example = {
        "image": image,
        "image_size": np.asarray(CANVAS, np.int32),
        "gt_boxes": np.zeros((MAX_INSTANCES, 4), np.float32),
        "gt_classes": np.zeros(MAX_INSTANCES, np.int32),
        "gt_is_crowd": np.zeros(MAX_INSTANCES, bool),
        "gt_valid": np.zeros(MAX_INSTANCES, bool),
        "gt_masks": np.zeros((MAX_INSTANCES, CROP_SIZE, CROP_SIZE), np.float32),
    }
    if count:
        example["gt_boxes"][:count] = boxes
        example["gt_classes"][:count] = [s[0] for s in shapes]
        example["gt_valid"][:count] = True
        example["gt_is_crowd"][list(crowd)] = True
        example["gt_masks"][:count] = np.asarray(ops.crop_masks_to_boxes(masks, boxes, CROP_SIZE))
    return example, masks


def stack(examples):
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def split(variables):
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}
