"""Pure jax.numpy detection ops with static output shapes (see DESIGN.md, floor `ops/`)."""

from maskrcnn_jax.ops.anchors import generate_anchors
from maskrcnn_jax.ops.boxes import (
    box_area,
    box_ioa,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    min_size_mask,
)
