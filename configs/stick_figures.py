"""Keypoints and masks from scratch on generated stick figures (data/stick_figures.py), sized for a 2-core CPU.

The shapes demo's recipe (ResNet-18 with GroupNorm, a 64-channel FPN, AdamW) with one class, person, and both
branches of the paper's Table 4 on: a per-class mask head and a keypoint head of 13 one-hot 56 x 56 masks (4 convs
of 64 channels instead of 8 of 512, to fit the CPU). The figures (60-180 px on 256-320 px images, several per image,
occluding each other, some crowds and empty images) are written to data.stick_figures.dir and built into
data.data_dir on the first run.
"""

from maskrcnn_jax.config import base_config


def get_config():
    config = base_config()

    m = config.model
    m.num_classes = 2  # person + background
    m.backbone.depth = 18
    m.backbone.norm = "gn"
    m.backbone.freeze_at = 0
    m.backbone.fpn_channels = 64
    m.anchors.sizes = (16, 32, 64, 128, 256)
    m.rpn.pre_nms_topk_train = 600
    m.rpn.post_nms_topk_train = 300
    m.rpn.pre_nms_topk_test = 300
    m.rpn.post_nms_topk_test = 100
    m.rpn.batch_size_per_image = 128
    m.roi_heads.batch_size_per_image = 64
    m.roi_heads.fc_dim = 256
    m.roi_heads.mask_conv_dim = 64
    m.roi_heads.mask_num_convs = 2
    m.keypoint_on = True
    m.keypoint_head.num_keypoints = 13
    m.keypoint_head.conv_dim = 64
    m.keypoint_head.num_convs = 4
    m.detection.detections_per_image = 20
    m.detection.pre_nms_topk = 500

    d = config.data
    d.name = "stick_figures"
    d.data_dir = "workdir/data/tfds"
    d.stick_figures.dir = "workdir/data/stick_figures"
    d.stick_figures.num_train = 2000
    d.stick_figures.num_val = 100
    d.canvas_size = (192, 192)
    d.max_instances = 8
    d.mask_size = 56
    d.shuffle_buffer = 2000

    t = config.train
    t.batch_size = 4
    t.num_steps = 1200
    t.optimizer = "adamw"
    t.base_lr = 1e-3
    t.weight_decay = 1e-4
    t.warmup_steps = 100
    t.warmup_factor = 0.01
    t.lr_steps = (1000,)
    t.grad_clip_norm = 10.0
    t.log_every = 25
    t.checkpoint_every = 250
    t.max_checkpoints_to_keep = 2
    t.eval_every = 0  # once, at the end (train.final_eval)

    e = config.eval
    e.batch_size = 4
    e.num_overlays = 8
    return config
