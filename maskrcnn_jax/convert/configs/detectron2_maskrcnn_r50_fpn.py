r"""detectron2's COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_{1x,3x} at inference, for its model-zoo weights.

    python -m maskrcnn_jax.convert --from=detectron2 model_final_f10217.pkl --out=WORKDIR \
        --config=configs/detectron2_maskrcnn_r50_fpn.py

What detectron2 does, and how it is set here:
  * Input: detectron2 feeds BGR minus the Caffe mean (103.53, 116.28, 123.675) with std 1. The importer reverses
    conv1's input channels (input_order="rgb"), so our RGB pipeline normalises with the same means in RGB order
    and std 1, and the network computes the same numbers.
  * Short side 800, long side at most 1333, padded to a multiple of 32 (ImageList.from_tensors with
    size_divisibility 32): at inference and evaluation each image gets its own canvas by that rule
    (data.eval_canvas "padded"); training keeps the fixed 1344 x 1344 canvas (data.canvas_size).
  * MSRA ResNet: the stride in the first 1x1 conv, FrozenBN (eps 1e-5), stem and res2 frozen.
  * RPN: 1000 per level before NMS 0.7, 1000 proposals at test (2000 / 1000 in training), L1 box loss.
  * ROIAlignV2 (aligned=True). detectron2's POOLER_SAMPLING_RATIO is 0 (adaptive: ceil(roi size / bin count)
    samples per bin, a per-RoI count); static shapes need a fixed count, and 2 is the one Detectron and the TF
    reference use. This is the one knowingly different setting: expect small numeric differences in pooled features.
  * 80 classes: detectron2's class i is our label i + 1 (num_classes 81, background slot 0).
  * Detection: score > 0.05, class-wise NMS 0.5, 100 per image; detectron2 drops no small boxes there (min_size 0).
Anchors: detectron2 does not round its cell anchors, torchvision (and ops.generate_anchors) rounds them to whole
pixels; the difference is below a pixel on every anchor and only moves where box deltas are applied.
"""

from maskrcnn_jax.config import base_config


def get_config():
    config = base_config()

    m = config.model
    m.num_classes = 81
    m.backbone.depth = 50
    m.backbone.norm = "frozen_bn"
    m.backbone.freeze_at = 2
    m.backbone.stride_in_1x1 = True
    m.backbone.fpn_channels = 256

    m.rpn.pre_nms_topk_train = 2000
    m.rpn.post_nms_topk_train = 1000
    m.rpn.pre_nms_topk_test = 1000
    m.rpn.post_nms_topk_test = 1000
    m.rpn.nms_threshold = 0.7
    m.rpn.min_size = 0.0
    m.rpn.box_loss_beta = 0.0

    r = m.roi_heads
    r.aligned = True
    r.sampling_ratio = 2
    r.box_loss_beta = 0.0
    r.box_pool_size = 7
    r.mask_pool_size = 14

    t = m.detection
    t.score_threshold = 0.05
    t.nms_threshold = 0.5
    t.detections_per_image = 100
    t.min_size = 0.0

    d = config.data
    d.name = "coco2017"
    d.canvas_size = (1344, 1344)
    d.short_side = 800
    d.long_side_max = 1333
    d.size_rounding = "half_up"  # ResizeShortestEdge: short side 800 exactly, int(long side + 0.5)
    d.eval_canvas = "padded"  # detectron2 pads each batch to a multiple of the backbone's size_divisibility
    d.size_divisibility = 32
    d.scale_jitter = (1.0, 1.0)
    d.pixel_mean = (123.675, 116.28, 103.53)  # detectron2's BGR Caffe mean, in RGB order
    d.pixel_std = (1.0, 1.0, 1.0)
    return config
