"""detectron2's R50-FPN 1x recipe (mask_rcnn_R_50_FPN_1x): 16 images per batch, LR 0.02, 90k steps decayed
by 10x at 60k and 80k, linear warmup over 1000 steps from 0.001, SGD momentum 0.9, weight decay 1e-4 (none on
norm parameters), short side jittered in 640-800 with the long side at most 1333, on a 1344 x 1344 canvas.

Set the COCO paths, e.g.
    --config.data.data_dir=/data/tfds --config.data.train_json=/coco/annotations/instances_train2017.json
    --config.data.train_images=/coco/train2017 --config.data.val_json=/coco/annotations/instances_val2017.json
    --config.data.val_images=/coco/val2017
The backbone should start from ImageNet weights (FrozenBN, stages up to res2 frozen, the defaults here).
"""

from maskrcnn_jax.config import base_config


def get_config():
    config = base_config()
    config.model.num_classes = 81  # 80 categories + background

    d = config.data
    d.name = "coco2017"
    d.canvas_size = (1344, 1344)  # holds 1333 on the long side, a multiple of the coarsest stride (64)
    d.short_side = 800
    d.long_side_max = 1333
    d.scale_jitter = (640 / 800, 1.0)  # short side U(640, 800): detectron2 samples the edge, we the scale
    d.max_instances = 100
    d.mask_size = 112

    t = config.train
    t.batch_size = 16
    t.num_steps = 90_000
    t.optimizer = "sgd"
    t.base_lr = 0.02
    t.momentum = 0.9
    t.weight_decay = 1e-4
    t.warmup_steps = 1000
    t.warmup_factor = 0.001
    t.lr_steps = (60_000, 80_000)
    t.lr_gamma = 0.1
    t.checkpoint_every = 5000
    t.eval_every = 10_000

    config.eval.batch_size = 8
    config.eval.max_dets = 100
    return config
