r"""torchvision's maskrcnn_resnet50_fpn (COCO_V1: 37.9 box AP, 34.6 mask AP) with every setting its model uses.

Import its weights, then predict or evaluate (or fine-tune from them):
    python -m maskrcnn_jax.convert --from=torchvision maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --out=WORKDIR \
        --config=configs/torchvision_maskrcnn_r50_fpn.py

Inference, as torchvision's GeneralizedRCNNTransform / RPN / RoIHeads do it:
  * RGB in [0, 1] normalised with the ImageNet mean and std; here on the 0-255 scale the pipeline uses
    ((x / 255 - 0.485) / 0.229 == (x - 123.675) / 58.395).
  * Short side 800, long side at most 1333, padded to a multiple of 32: at inference and evaluation each image gets
    its own canvas by that rule (data.eval_canvas "padded"), which is torchvision's padded batch of one image, so the
    features, anchors and proposals equal torchvision's on any photograph (one compile per distinct canvas; set
    data.eval_canvas_step or data.eval_canvas_sides to bound them, at the price of exact equality). Training
    keeps the fixed 1344 x 1344 canvas (data.canvas_size).
  * The ResNet stride in the 3x3 conv, FrozenBatchNorm with eps 1e-5.
  * RPN: 1000 top-scoring anchors per level, NMS 0.7, 1000 proposals, boxes smaller than 1e-3 dropped.
  * RoIAlign with aligned=False and sampling ratio 2 (torchvision's MultiScaleRoIAlign).
  * 91 label slots: label k is COCO category id k (slot 0 background, the 10 unused ids never fire), score > 0.05,
    class-wise NMS 0.5, 100 detections, boxes smaller than 1e-2 dropped.
  * The resized size floored, and masks pasted as its paste_masks_in_image does.
Training settings follow torchvision's detection reference recipe where they differ from detectron2's: 2000
proposals kept per image in training, smooth-L1 with beta 1/9, the last three ResNet stages trainable.
"""

from maskrcnn_jax.config import base_config


def get_config():
    config = base_config()

    m = config.model
    m.num_classes = 91
    m.backbone.depth = 50
    m.backbone.norm = "frozen_bn"
    m.backbone.freeze_at = 2  # trainable_backbone_layers=3: conv1 and layer1 frozen
    m.backbone.stride_in_1x1 = False
    m.backbone.fpn_channels = 256
    m.anchors.strides = (4, 8, 16, 32, 64)
    m.anchors.sizes = (32, 64, 128, 256, 512)
    m.anchors.aspect_ratios = (0.5, 1.0, 2.0)

    m.rpn.iou_thresholds = (0.3, 0.7)
    m.rpn.batch_size_per_image = 256
    m.rpn.positive_fraction = 0.5
    m.rpn.box_loss_beta = 1.0 / 9
    m.rpn.pre_nms_topk_train = 2000
    m.rpn.post_nms_topk_train = 2000
    m.rpn.pre_nms_topk_test = 1000
    m.rpn.post_nms_topk_test = 1000
    m.rpn.nms_threshold = 0.7
    m.rpn.min_size = 1e-3

    r = m.roi_heads
    r.batch_size_per_image = 512
    r.positive_fraction = 0.25
    r.iou_threshold = 0.5
    r.box_loss_beta = 1.0 / 9
    r.roi_op = "align"
    r.aligned = False
    r.sampling_ratio = 2
    r.box_pool_size = 7
    r.mask_pool_size = 14
    r.fc_dim = 1024
    r.mask_head = "fcn"
    r.mask_conv_dim = 256
    r.mask_num_convs = 4
    r.mask_loss = "sigmoid"
    r.class_agnostic_mask = False

    t = m.detection
    t.score_threshold = 0.05
    t.nms_threshold = 0.5
    t.detections_per_image = 100
    t.min_size = 1e-2

    d = config.data
    d.name = "coco2017"
    d.canvas_size = (1344, 1344)
    d.short_side = 800
    d.long_side_max = 1333
    d.size_rounding = "floor"  # torchvision: int(h * scale), so 600 x 512 becomes 937 x 800
    d.eval_canvas = "padded"  # GeneralizedRCNNTransform.batch_images: 937 x 800 runs on a 960 x 800 canvas
    d.size_divisibility = 32

    config.eval.mask_paste = "torchvision"  # its paste_masks_in_image: padded grid, integer boxes
    d.scale_jitter = (1.0, 1.0)
    d.pixel_mean = (123.675, 116.28, 103.53)  # RGB, 0-255 scale
    d.pixel_std = (58.395, 57.12, 57.375)
    return config
