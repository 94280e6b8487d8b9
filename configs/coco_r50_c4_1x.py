"""The paper's R50-C4 Mask R-CNN on COCO with detectron2's 1x recipe (mask_rcnn_R_50_C4_1x): the training
schedule, data and input of coco_r50_fpn_1x.py, with the C4 model of detectron2's Base-RCNN-C4:

  * ResNet-50 up to C4 (stride 16). The RPN reads C4 alone: one level, 5 anchor sizes (32-512) x 3 aspect ratios =
    15 anchors per position; 12000 / 6000 top-scoring anchors before NMS in training / test, 2000 / 1000 after.
  * RoIAlign (aligned) 14 x 14 on C4, then res5 (its stride 2 in the first block) on every RoI: 7 x 7 x 2048.
  * Box head: res5's output averaged over space, then the class and box predictors.
  * Mask head on the same 7 x 7 res5 output: a 2 x 2 stride-2 transposed conv to 14 x 14 x 256, then one 14 x 14
    mask per class (the paper's Figure 4, left). Masks are 14 x 14, not 28 x 28.

The backbone (stem to res4, and res5) starts from ImageNet weights, as for R50-FPN. RoIs per image stay
detectron2's 512 (the paper sampled 64 per image for C4, 512 for FPN).
"""

import pathlib

from maskrcnn_jax.config import load

C4_ANCHOR_SIZES = (32, 64, 128, 256, 512)  # all on the one stride-16 level


def get_config():
    config = load(pathlib.Path(__file__).with_name("coco_r50_fpn_1x.py"))
    m = config.model
    m.backbone.kind = "c4"
    m.backbone.depth = 50
    m.anchors.strides = (16,)
    m.anchors.sizes = C4_ANCHOR_SIZES
    m.anchors.aspect_ratios = (0.5, 1.0, 2.0)
    m.rpn.pre_nms_topk_train = 12000
    m.rpn.pre_nms_topk_test = 6000
    m.rpn.post_nms_topk_train = 2000
    m.rpn.post_nms_topk_test = 1000

    r = m.roi_heads
    r.pool_strides = (16,)
    r.box_pool_size = 14  # res5 halves it to 7
    r.mask_num_convs = 0  # the transposed conv reads res5's output directly
    r.mask_conv_dim = 256
    return config
