"""detectron2's Mask R-CNN checkpoints described by their layer shapes, built from detectron2's module definitions
(detectron2 itself is not installed): synthetic model-zoo pickles for the importer tests and parameter counts for
the model-size tests."""

RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
NORM_BUFFERS = ("weight", "bias", "running_mean", "running_var")  # FrozenBatchNorm2d's buffers


def _conv(shapes, name, out_channels, in_channels, kernel, norm=True, bias=False):
    shapes[f"{name}.weight"] = (out_channels, in_channels, kernel, kernel)
    if bias:
        shapes[f"{name}.bias"] = (out_channels,)
    if norm:
        for leaf in NORM_BUFFERS:
            shapes[f"{name}.norm.{leaf}"] = (out_channels,)


def _bottleneck_stage(shapes, prefix, blocks, in_channels, planes):
    """BottleneckBlock(s) of modeling/backbone/resnet.py: `conv1..3` and, in the first block, `shortcut`."""
    for block in range(blocks):
        name = f"{prefix}.{block}"
        if block == 0:
            _conv(shapes, f"{name}.shortcut", planes * 4, in_channels, 1)
        _conv(shapes, f"{name}.conv1", planes, in_channels, 1)
        _conv(shapes, f"{name}.conv2", planes, planes, 3)
        _conv(shapes, f"{name}.conv3", planes * 4, planes, 1)
        in_channels = planes * 4
    return in_channels


def _rpn(shapes, channels, num_anchors):
    """StandardRPNHead: a 3x3 conv keeping the width, then objectness and 4 deltas per anchor."""
    _conv(shapes, "proposal_generator.rpn_head.conv", channels, channels, 3, norm=False, bias=True)
    _conv(shapes, "proposal_generator.rpn_head.objectness_logits", num_anchors, channels, 1, norm=False, bias=True)
    _conv(shapes, "proposal_generator.rpn_head.anchor_deltas", 4 * num_anchors, channels, 1, norm=False, bias=True)


def _linear(shapes, name, out_features, in_features):
    shapes[f"{name}.weight"] = (out_features, in_features)
    shapes[f"{name}.bias"] = (out_features,)


def detectron2_zoo_shapes(depth=50, num_classes=80):
    """{name: shape} of a detectron2 model-zoo Mask R-CNN R-{depth}-FPN checkpoint (e.g. model_final_f10217.pkl).

    The names are those detectron2's modules register: modeling/backbone/resnet.py (BasicStem `stem.conv1`,
    BottleneckBlock `conv1..3` and `shortcut`, every Conv2d with a FrozenBatchNorm2d `.norm`), backbone/fpn.py
    (`fpn_lateral{2-5}`, `fpn_output{2-5}`), proposal_generator/rpn.py StandardRPNHead (`conv`,
    `objectness_logits`, `anchor_deltas`), roi_heads/box_head.py FastRCNNConvFCHead (`fc1`, `fc2`),
    roi_heads/fast_rcnn.py FastRCNNOutputLayers (`cls_score` K+1 rows, `bbox_pred` 4K rows), roi_heads/mask_head.py
    MaskRCNNConvUpsampleHead (`mask_fcn1..4`, `deconv`, `predictor` K channels). Files written before detectron2
    made them non-persistent also hold the `pixel_mean` / `pixel_std` buffers [3, 1, 1].
    """
    shapes = {"pixel_mean": (3, 1, 1), "pixel_std": (3, 1, 1)}
    body = "backbone.bottom_up"
    _conv(shapes, f"{body}.stem.conv1", 64, 3, 7)
    in_channels = 64
    for stage, blocks in enumerate(RESNET_BLOCKS[depth]):
        in_channels = _bottleneck_stage(shapes, f"{body}.res{stage + 2}", blocks, in_channels, 64 * 2**stage)
    for level in range(2, 6):
        _conv(shapes, f"backbone.fpn_lateral{level}", 256, 64 * 2 ** (level - 2) * 4, 1, norm=False, bias=True)
        _conv(shapes, f"backbone.fpn_output{level}", 256, 256, 3, norm=False, bias=True)
    _rpn(shapes, 256, 3)
    _linear(shapes, "roi_heads.box_head.fc1", 1024, 256 * 7 * 7)
    _linear(shapes, "roi_heads.box_head.fc2", 1024, 1024)
    _linear(shapes, "roi_heads.box_predictor.cls_score", num_classes + 1, 1024)
    _linear(shapes, "roi_heads.box_predictor.bbox_pred", 4 * num_classes, 1024)
    for i in range(1, 5):
        _conv(shapes, f"roi_heads.mask_head.mask_fcn{i}", 256, 256, 3, norm=False, bias=True)
    shapes["roi_heads.mask_head.deconv.weight"] = (256, 256, 2, 2)  # ConvTranspose2d: [in, out, kh, kw]
    shapes["roi_heads.mask_head.deconv.bias"] = (256,)
    _conv(shapes, "roi_heads.mask_head.predictor", num_classes, 256, 1, norm=False, bias=True)
    return shapes


def detectron2_c4_zoo_shapes(depth=50, num_classes=80):
    """{name: shape} of a detectron2 model-zoo Mask R-CNN R-{depth}-C4 checkpoint
    (COCO-InstanceSegmentation/mask_rcnn_R_{50,101}_C4_{1x,3x}).

    From configs/Base-RCNN-C4.yaml and config/defaults.py: the backbone is a ResNet with OUT_FEATURES ["res4"], so
    its stem and res2-res4 sit directly under `backbone.` (no `bottom_up`); the RPN reads res4 (1024 channels)
    with 5 sizes x 3 ratios = 15 anchors; roi_heads.py Res5ROIHeads holds `res5` (3 BottleneckBlocks, 1024 ->
    2048, the stride 2 in the first), a FastRCNNOutputLayers `box_predictor` on the 2048 average-pooled channels,
    and MaskRCNNConvUpsampleHead with NUM_CONV 0: `deconv` (2048 -> 256, 2x2) and `predictor` (256 -> K).
    """
    shapes = {"pixel_mean": (3, 1, 1), "pixel_std": (3, 1, 1)}
    _conv(shapes, "backbone.stem.conv1", 64, 3, 7)
    in_channels = 64
    blocks = RESNET_BLOCKS[depth]
    for stage in range(3):
        in_channels = _bottleneck_stage(shapes, f"backbone.res{stage + 2}", blocks[stage], in_channels, 64 * 2**stage)
    _rpn(shapes, in_channels, 15)
    in_channels = _bottleneck_stage(shapes, "roi_heads.res5", blocks[3], in_channels, 512)
    _linear(shapes, "roi_heads.box_predictor.cls_score", num_classes + 1, in_channels)
    _linear(shapes, "roi_heads.box_predictor.bbox_pred", 4 * num_classes, in_channels)
    shapes["roi_heads.mask_head.deconv.weight"] = (in_channels, 256, 2, 2)
    shapes["roi_heads.mask_head.deconv.bias"] = (256,)
    _conv(shapes, "roi_heads.mask_head.predictor", num_classes, 256, 1, norm=False, bias=True)
    return shapes


def is_frozen_bn_buffer(name):
    return any(name.endswith(f".norm.{leaf}") for leaf in NORM_BUFFERS)
