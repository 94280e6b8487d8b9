"""Pure jax.numpy detection ops with static output shapes (docs/design.md, floor 0)."""

from maskrcnn_jax.ops.anchors import generate_anchors
from maskrcnn_jax.ops.boxes import (
    box_area,
    box_ioa,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    encode_matched_boxes,
    min_size_mask,
)
from maskrcnn_jax.ops.images import normalize_canvas
from maskrcnn_jax.ops.keypoints import (
    KEYPOINT_LOSS_NORMALIZATIONS,
    detectron2_keypoint_loss_normalizer,
    keypoint_loss,
    keypoint_targets,
)
from maskrcnn_jax.ops.losses import (
    SOFTMAX_MASK_DECODINGS,
    sigmoid_binary_cross_entropy,
    sigmoid_mask_loss,
    smooth_l1_loss,
    softmax_cross_entropy,
    softmax_mask_loss,
    softmax_mask_probability,
)
from maskrcnn_jax.ops.masks import (
    crop_masks_to_boxes,
    mask_targets_from_cropped,
    paste_mask_probabilities,
    paste_masks,
)
from maskrcnn_jax.ops.matching import match_boxes, match_quality_matrix
from maskrcnn_jax.ops.nms import batched_nms, nms
from maskrcnn_jax.ops.roi_align import (
    ROI_REDUCTIONS,
    FlatPyramid,
    flatten_pyramid,
    fpn_level_for_boxes,
    multilevel_roi_align,
    roi_align,
)
from maskrcnn_jax.ops.roi_pool import multilevel_roi_pool, roi_pool
from maskrcnn_jax.ops.roi_warp import multilevel_roi_warp, roi_warp
from maskrcnn_jax.ops.sampling import sample_balanced
