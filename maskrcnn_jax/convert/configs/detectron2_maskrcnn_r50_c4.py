r"""detectron2's COCO-InstanceSegmentation/mask_rcnn_R_50_C4_{1x,3x} at inference, for its model-zoo weights.

    python -m maskrcnn_jax.convert --from=detectron2 model_final_C4.pkl --out=WORKDIR \
        --config=configs/detectron2_maskrcnn_r50_c4.py

Everything configs/detectron2_maskrcnn_r50_fpn.py says about detectron2's input, MSRA ResNet, RoIAlignV2 (with a
fixed sampling ratio of 2 where detectron2 adapts it), classes and detection holds here too. The model is
detectron2's Base-RCNN-C4 (Res5ROIHeads): the RPN on res4 with 15 anchors per position (5 sizes x 3 ratios, in
detectron2's size-major order), 6000 anchors before NMS and 1000 proposals at test (12000 / 2000 in training),
RoIAlign 14 x 14 on res4, res5 on every RoI, the box predictor on its spatial average, and the mask head's 2 x 2
transposed conv on its 7 x 7 output (14 x 14 masks).
"""

from maskrcnn_jax.convert.configs.detectron2_maskrcnn_r50_fpn import get_config as detectron2_r50_fpn_config


def get_config():
    config = detectron2_r50_fpn_config()
    m = config.model
    m.backbone.kind = "c4"
    m.anchors.strides = (16,)
    m.anchors.sizes = (32, 64, 128, 256, 512)
    m.anchors.aspect_ratios = (0.5, 1.0, 2.0)
    m.rpn.pre_nms_topk_train = 12000
    m.rpn.post_nms_topk_train = 2000
    m.rpn.pre_nms_topk_test = 6000
    m.rpn.post_nms_topk_test = 1000
    r = m.roi_heads
    r.pool_strides = (16,)
    r.box_pool_size = 14
    r.mask_num_convs = 0
    r.mask_conv_dim = 256
    return config
