"""The base configuration every file in configs/ starts from: four sections, every knob a user may turn.

    config.model   modeling.defaults.model_config(): backbone, anchors, RPN, RoI heads, detection
    config.data    which dataset (a built TFDS dir, or COCO-format JSON + images, or generated shapes)
                   and the input pipeline (fields of data.transforms.InputOptions)
    config.train   batch size, schedule, optimizer, logging, checkpointing, evaluation cadence
    config.eval    evaluation batch size, COCOeval maxDets, mask threshold, overlay PNGs

Optional values are ml_collections placeholders (typed None), so `--config.data.short_side=800` still parses
as an int. `validate(config)` checks combinations that a single field cannot.
"""

import ml_collections
from ml_collections import config_dict

from maskrcnn_jax.modeling.defaults import model_config

OPTIMIZERS = ("sgd", "adamw")


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = model_config()

    data = config.data = ml_collections.ConfigDict()
    # The dataset: `name` + `data_dir` locate the built TFDS records; the four paths are the COCO-format
    # sources it is built from when it is not built yet (data.builder.build).
    data.name = "coco2017"
    data.data_dir = config_dict.placeholder(str)
    data.train_json = config_dict.placeholder(str)
    data.train_images = config_dict.placeholder(str)
    data.val_json = config_dict.placeholder(str)
    data.val_images = config_dict.placeholder(str)
    data.train_split = "train"
    data.eval_split = "validation"
    # Generated shapes (data.synthetic): when num_train > 0, `shapes_dir` is filled first and the four
    # paths above are taken from it.
    data.shapes = ml_collections.ConfigDict()
    data.shapes.dir = config_dict.placeholder(str)
    data.shapes.num_train = 0
    data.shapes.num_val = 0
    data.shapes.seed = 0
    # The input pipeline (data.transforms.InputOptions): fields of the same names.
    data.canvas_size = (1024, 1024)
    data.short_side = config_dict.placeholder(int)
    data.long_side_max = config_dict.placeholder(int)
    data.scale_jitter = (1.0, 1.0)
    data.random_flip = True
    data.max_instances = 100
    data.mask_size = 112
    data.pixel_mean = (123.675, 116.28, 103.53)
    data.pixel_std = (58.395, 57.12, 57.375)
    data.size_rounding = "round"  # or "floor", as torchvision makes the resized size whole
    data.mask_dtype = "float32"
    data.shuffle_buffer = 1024
    data.deterministic = True
    # Keypoint types a horizontal flip swaps, as (name, mirrored name) pairs, e.g. (("l_eye", "r_eye"),);
    # empty: left_X <-> right_X derived from the dataset's keypoint names (data.keypoints.flip_permutation).
    data.keypoint_flip_map = ()
    data.seed = 0  # tf.data shuffling and augmentation

    train = config.train = ml_collections.ConfigDict()
    train.batch_size = 16  # global, over all processes and devices
    train.num_steps = 90_000
    train.optimizer = "sgd"  # sgd (with momentum) | adamw
    train.base_lr = 0.02
    train.momentum = 0.9  # sgd only
    train.weight_decay = 1e-4  # on conv and dense kernels only: never on norm parameters or biases
    train.warmup_steps = 1000
    train.warmup_factor = 0.001  # detectron2's linear warmup starts at base_lr * warmup_factor
    train.lr_steps = (60_000, 80_000)  # multiply the learning rate by lr_gamma at each
    train.lr_gamma = 0.1
    train.grad_clip_norm = 0.0  # clip the global gradient norm to this; 0 turns clipping off
    train.seed = 0  # parameter init and the sampling RNG of the train step
    train.log_every = 20
    train.checkpoint_every = 5000
    train.max_checkpoints_to_keep = 3  # the latest ones; the best by mask AP is kept besides
    train.eval_every = 10_000  # 0: no periodic evaluation
    train.final_eval = True  # evaluate after the last step
    train.eval_only = False  # evaluate the latest checkpoint (or fresh weights) and stop

    evaluation = config.eval = ml_collections.ConfigDict()
    evaluation.batch_size = 8  # global
    evaluation.max_dets = 100  # COCOeval's third maxDets (AP and AR100 use it), at least 10
    evaluation.mask_threshold = 0.5
    evaluation.mask_paste = "detectron2"  # or "torchvision": how 28 x 28 masks are pasted into the image
    evaluation.num_overlays = 0  # PNGs of predictions on the first validation images, in WORKDIR/overlays
    evaluation.overlay_score_threshold = 0.5
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for settings that cannot work together."""
    t = config.train
    if t.optimizer not in OPTIMIZERS:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {t.optimizer!r}")
    if t.batch_size < 1 or config.eval.batch_size < 1:
        raise ValueError("train.batch_size and eval.batch_size must be positive")
    if list(t.lr_steps) != sorted(t.lr_steps):
        raise ValueError(f"train.lr_steps must be increasing, got {t.lr_steps}")
    if t.checkpoint_every < 1 or t.log_every < 1:
        raise ValueError("train.checkpoint_every and train.log_every must be positive")
    if config.eval.max_dets < 10:
        raise ValueError(f"eval.max_dets must be at least 10, got {config.eval.max_dets}")
    canvas = tuple(config.data.canvas_size)
    stride = max(config.model.anchors.strides)
    if any(side % stride for side in canvas):
        raise ValueError(f"data.canvas_size {canvas} must be a multiple of the coarsest stride {stride}")
