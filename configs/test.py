"""A tiny config for tests and smoke runs: 128 px canvas, ResNet-18 with 32 FPN channels, a handful of RoIs."""

from maskrcnn_jax.config import base_config


def get_config():
    config = base_config()

    m = config.model
    m.num_classes = 6
    m.backbone.depth = 18
    m.backbone.norm = "gn"
    m.backbone.freeze_at = 0
    m.backbone.fpn_channels = 32
    m.anchors.sizes = (16, 32, 64, 128, 256)
    m.rpn.pre_nms_topk_train = m.rpn.pre_nms_topk_test = 100
    m.rpn.post_nms_topk_train = m.rpn.post_nms_topk_test = 32
    m.rpn.batch_size_per_image = 32
    m.roi_heads.batch_size_per_image = 16
    m.roi_heads.fc_dim = 32
    m.roi_heads.mask_head = "mlp"  # the cheapest head to compile
    # Two RoI buckets keep the mask head inside the training switch, as by default, at half the branches to compile.
    m.roi_heads.mask_roi_buckets = 2
    m.detection.detections_per_image = 8
    m.detection.pre_nms_topk = 100

    d = config.data
    d.name = "shapes_test"
    d.data_dir = "workdir/test/tfds"
    d.shapes.dir = "workdir/test/shapes"
    d.shapes.num_train = 16
    d.shapes.num_val = 4
    d.canvas_size = (128, 128)
    d.max_instances = 8
    d.mask_size = 14
    d.shuffle_buffer = 16

    t = config.train
    t.batch_size = 2
    t.num_steps = 4
    t.optimizer = "sgd"
    t.base_lr = 0.01
    t.warmup_steps = 2
    t.lr_steps = (3,)
    t.log_every = 1
    t.checkpoint_every = 2
    t.max_checkpoints_to_keep = 2
    t.eval_every = 0

    e = config.eval
    e.batch_size = 2
    e.max_dets = 10
    return config
