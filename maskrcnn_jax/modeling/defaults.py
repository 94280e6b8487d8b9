"""The model's knobs with detectron2's R50-FPN defaults; configs/ start from this and override."""

import ml_collections
from ml_collections import config_dict


def model_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_classes = 91  # including background, as torchvision counts (COCO: 80 used ids out of 1..90)
    c.dtype = "float32"  # compute dtype: float32 | bfloat16; parameters, losses, decoding and NMS stay float32
    # Crowd annotations: "ignore" makes anchors and proposals lying at least crowd_ioa_threshold inside a crowd
    # region (intersection over their own area) neither positive nor negative; "drop" treats crowd regions as
    # absent, as detectron2 and torchvision do. Crowd regions are never foreground either way.
    c.crowd_regions = "ignore"
    c.crowd_ioa_threshold = 0.7
    # Which branches beside the box head: masks (Mask R-CNN) and keypoints (the paper's section 5; detectron2's
    # MASK_ON and KEYPOINT_ON). The paper's Table 4 rows are keypoint_on with mask_on True or False.
    c.mask_on = True
    c.keypoint_on = False

    c.backbone = ml_collections.ConfigDict()
    # fpn: ResNet-FPN; c4: RPN and RoI pooling on C4 with res5 as the RoI head; c5: RPN and RoI pooling on C5 with
    # the FPN-style heads (the paper's Table 2; modeling/mask_rcnn.py). c4 and c5 need anchors.strides and
    # roi_heads.pool_strides of (16,) and (32,), and put every anchor size on that one level.
    c.backbone.kind = "fpn"
    c.backbone.depth = 50
    # ResNeXt: groups x width_per_group channels in the first stage's bottleneck (X101-32x8d: 32, 8); 1, 64 is ResNet.
    c.backbone.groups = 1
    c.backbone.width_per_group = 64
    c.backbone.norm = "frozen_bn"  # frozen_bn | bn | gn
    c.backbone.freeze_at = 2  # detectron2: stem and res2 frozen when starting from pretrained weights
    c.backbone.stride_in_1x1 = False  # True for MSRA / detectron2 weights
    c.backbone.fpn_channels = 256

    c.anchors = ml_collections.ConfigDict()
    c.anchors.strides = (4, 8, 16, 32, 64)
    c.anchors.sizes = (32, 64, 128, 256, 512)
    c.anchors.aspect_ratios = (0.5, 1.0, 2.0)

    c.rpn = ml_collections.ConfigDict()
    c.rpn.iou_thresholds = (0.3, 0.7)
    c.rpn.batch_size_per_image = 256
    c.rpn.positive_fraction = 0.5
    c.rpn.box_loss_beta = 0.0
    c.rpn.pre_nms_topk_train = 2000
    c.rpn.pre_nms_topk_test = 1000
    c.rpn.post_nms_topk_train = 1000
    c.rpn.post_nms_topk_test = 1000
    c.rpn.nms_threshold = 0.7
    c.rpn.min_size = 1e-3

    c.roi_heads = ml_collections.ConfigDict()
    c.roi_heads.batch_size_per_image = 512
    c.roi_heads.positive_fraction = 0.25
    c.roi_heads.iou_threshold = 0.5
    c.roi_heads.box_loss_beta = 0.0
    c.roi_heads.roi_op = "align"  # align | pool | warp (the paper's Table 2c: RoIAlign, RoIPool, RoIWarp)
    # avg | max over each bin's bilinear samples, for align and warp (unset: avg); RoIPool is a max by definition.
    c.roi_heads.roi_reduce = config_dict.placeholder(str)
    c.roi_heads.aligned = True  # detectron2's ROIAlignV2; torchvision's weights expect False
    c.roi_heads.sampling_ratio = 2
    c.roi_heads.box_pool_size = 7  # c4: 14, which res5 halves to 7
    c.roi_heads.mask_pool_size = 14  # the masks are twice this (c4: twice res5's side, read from the box pooling)
    c.roi_heads.pool_strides = (4, 8, 16, 32)  # P2..P5, as both peers pool; c4: (16,), c5: (32,)
    c.roi_heads.fc_dim = 1024
    c.roi_heads.mask_head = "fcn"  # fcn | mlp
    c.roi_heads.mask_conv_dim = 256
    c.roi_heads.mask_num_convs = 4  # c4: 0 (the transposed conv reads res5 directly)
    c.roi_heads.mask_loss = "sigmoid"  # sigmoid | softmax
    # softmax masks at inference: versus_background (p[c] / (p[c] + p[0])) | class_probability (p[c]); ops.losses
    c.roi_heads.softmax_mask_decoding = "versus_background"
    c.roi_heads.class_agnostic_mask = False
    # The mask head runs on the smallest of this many prefix sizes (128, 64, 32, 16) that holds every positive RoI
    # of the batch; 1 = always the full batch_size_per_image * positive_fraction. Same loss either way.
    c.roi_heads.mask_roi_buckets = 4

    c.keypoint_head = ml_collections.ConfigDict()
    c.keypoint_head.num_keypoints = 17  # the dataset's K (COCO's 17 people keypoints)
    c.keypoint_head.conv_dim = 512
    c.keypoint_head.num_convs = 8
    c.keypoint_head.pool_size = 14  # RoIAlign output; the heatmaps are 4x this (56 x 56)
    c.keypoint_head.loss_normalization = "visible"  # visible | fixed (modeling.mask_rcnn.KEYPOINT_LOSS_NORMALIZATIONS)
    c.keypoint_head.loss_weight = 1.0

    c.detection = ml_collections.ConfigDict()
    c.detection.score_threshold = 0.05
    c.detection.nms_threshold = 0.5
    c.detection.detections_per_image = 100
    c.detection.pre_nms_topk = 5000
    c.detection.min_size = 1e-2
    return c
