"""The base configuration every file in configs/ starts from: four sections, every knob a user may turn.

    config.model   modeling.defaults.model_config(): backbone, anchors, RPN, RoI heads, detection
    config.data    which dataset (a built TFDS dir, or COCO-format JSON + images, or generated shapes), how
                   its files are read (fields of data.options.BuildOptions) and the input pipeline (fields of
                   data.options.InputOptions)
    config.train   batch size, schedule, optimizer, logging, checkpointing, evaluation cadence
    config.eval    evaluation batch size, COCOeval maxDets, mask threshold, overlay PNGs

and `config.compilation_cache_dir`, where compiled executables are kept between runs.

Optional values are ml_collections placeholders (typed None), so `--config.data.short_side=800` still parses
as an int. `validate(config)` checks combinations that a single field cannot.
"""

import dataclasses
import importlib.util
import pathlib

import ml_collections
from ml_collections import config_dict

from maskrcnn_jax.data.options import BuildOptions, InputOptions, optional_value_type
from maskrcnn_jax.modeling.defaults import model_config

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("multistep", "cosine")
ON_NONFINITE = ("stop", "skip")


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = model_config()

    data = config.data = ml_collections.ConfigDict()
    # The dataset: `name` + `data_dir` locate the built TFDS records; the four paths are the COCO-format
    # sources it is built from when it is not built yet (data.coco_dataset.build).
    data.name = "coco2017"
    data.data_dir = config_dict.placeholder(str)
    data.train_json = config_dict.placeholder(str)
    data.train_images = config_dict.placeholder(str)
    data.val_json = config_dict.placeholder(str)
    data.val_images = config_dict.placeholder(str)
    # How the builder treats the files, which it takes for untrusted (data/options.py's BuildOptions says more):
    # a file_name resolving outside its image folder is an error unless this is True;
    data.allow_paths_outside_images_dir = BuildOptions.allow_paths_outside_images_dir
    # an image whose header claims more pixels than this is skipped and counted, never decoded (PIL's own limit).
    data.max_image_pixels = BuildOptions.max_image_pixels
    data.train_split = "train"
    data.eval_split = "validation"
    # Generated datasets: when num_train > 0, `dir` is filled first and the four paths above come from it (set
    # at most one of the two, and then none of the paths). shapes: 5 classes of shapes (data.synthetic);
    # stick_figures: people with 13 named joints, for keypoints (data.stick_figures).
    for generated in ("shapes", "stick_figures"):
        section = data[generated] = ml_collections.ConfigDict()
        section.dir = config_dict.placeholder(str)
        section.num_train = 0
        section.num_val = 0
        section.seed = 0
    # The input pipeline: every field of data/options.py's InputOptions, with its default and its meaning there.
    for field in dataclasses.fields(InputOptions):
        default = field.default
        setattr(data, field.name, config_dict.placeholder(optional_value_type(field.name)) if default is None
                else default)
    data.seed = 0  # tf.data shuffling and augmentation

    train = config.train = ml_collections.ConfigDict()
    train.batch_size = 16  # global, over all processes and devices
    train.num_steps = 90_000
    train.optimizer = "sgd"  # sgd (with momentum) | adamw
    train.base_lr = 0.02
    train.momentum = 0.9  # sgd only
    train.weight_decay = 1e-4  # on conv and dense kernels
    train.weight_decay_bias = 0.0  # on their biases (detectron2's WEIGHT_DECAY_BIAS)
    train.weight_decay_norm = 0.0  # on norm scales and shifts (detectron2's WEIGHT_DECAY_NORM)
    train.lr_schedule = "multistep"  # multistep | cosine (detectron2's WarmupMultiStepLR | WarmupCosineLR)
    train.warmup_steps = 1000
    train.warmup_factor = 0.001  # detectron2's linear warmup starts at base_lr * warmup_factor
    train.lr_steps = (60_000, 80_000)  # multistep: multiply the learning rate by lr_gamma at each
    train.lr_gamma = 0.1
    train.lr_end_factor = 0.0  # cosine: the learning rate at num_steps, as a fraction of base_lr
    train.grad_clip_norm = 0.0  # clip the global gradient norm to this; 0 turns clipping off
    train.ema_decay = 0.0  # > 0: keep this moving average of the parameters and evaluate and predict with it
    # A step whose loss or gradient is not finite never updates the state. "stop" then ends the run with an error
    # naming the step and the image ids; "skip" logs them, counts the step and goes on, and ends the run after
    # max_consecutive_skips such steps in a row.
    train.on_nonfinite = "stop"
    train.max_consecutive_skips = 10
    train.seed = 0  # parameter init and the sampling RNG of the train step
    train.log_every = 20
    train.checkpoint_every = 5000
    train.max_checkpoints_to_keep = 3  # the latest ones; the best by mask AP is kept besides
    train.eval_every = 10_000  # 0: no periodic evaluation
    train.final_eval = True  # evaluate after the last step
    train.eval_only = False  # evaluate a checkpoint of the workdir (eval.step, default the latest) and stop

    evaluation = config.eval = ml_collections.ConfigDict()
    evaluation.batch_size = 8  # global
    evaluation.step = config_dict.placeholder(int)  # train.eval_only: the checkpoint to evaluate; None = latest
    evaluation.max_dets = 100  # COCOeval's third maxDets (AP and AR100 use it), at least 10
    evaluation.mask_threshold = 0.5
    evaluation.mask_paste = "detectron2"  # or "torchvision", "matterport" (serving/host.py): how masks are pasted
    # How keypoint heatmaps become keypoints (serving/keypoints.py): "torchvision" (score = the heatmap's logit at
    # the maximum, as its heatmaps_to_keypoints) or "detectron2" (score = the softmax probability there).
    evaluation.keypoint_decode = "torchvision"
    # OKS sigmas of the dataset's K keypoint types for COCOeval; empty: the dataset's own (its category's
    # kpt_oks_sigmas), else COCO's 17 when K is 17, else an error.
    evaluation.kpt_oks_sigmas = ()
    evaluation.num_overlays = 0  # PNGs of predictions on the first validation images, in WORKDIR/overlays
    evaluation.overlay_score_threshold = 0.5
    # Worker processes that map, paste and RLE-encode each image's detections while the devices predict the next
    # batch (evaluation/host_pool.py); 0: in the evaluating process. None: min(cores available, 8). A worker
    # does ~45 COCO images/s (~22 ms each, benchmarks/coco_scale.py), so 8 (~360/s) outpace what a host's 8
    # accelerators predict at COCO's scale, and the other cores stay with tf.data and the main thread. It is per
    # process: with one process per accelerator on a host, give each its share of the cores.
    evaluation.host_workers = config_dict.placeholder(int)
    # JAX's persistent compilation cache (engine/compilation_cache.py): None = the user's cache directory,
    # "" = off, else the folder. A second run on the same shapes loads its executables instead of compiling.
    config.compilation_cache_dir = config_dict.placeholder(str)
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for settings that cannot work together."""
    t = config.train
    if t.optimizer not in OPTIMIZERS:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {t.optimizer!r}")
    if t.on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"train.on_nonfinite must be one of {ON_NONFINITE}, got {t.on_nonfinite!r}")
    if not 0 <= t.ema_decay < 1:
        raise ValueError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if t.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {t.lr_schedule!r}")
    if t.batch_size < 1 or config.eval.batch_size < 1:
        raise ValueError("train.batch_size and eval.batch_size must be positive")
    if list(t.lr_steps) != sorted(t.lr_steps):
        raise ValueError(f"train.lr_steps must be increasing, got {t.lr_steps}")
    if t.checkpoint_every < 1 or t.log_every < 1:
        raise ValueError("train.checkpoint_every and train.log_every must be positive")
    if config.eval.max_dets < 10:
        raise ValueError(f"eval.max_dets must be at least 10, got {config.eval.max_dets}")
    if config.eval.host_workers is not None and config.eval.host_workers < 0:
        raise ValueError(f"eval.host_workers must be None (automatic) or at least 0, got {config.eval.host_workers}")
    canvas = tuple(config.data.canvas_size)
    stride = max(config.model.anchors.strides)
    if any(side % stride for side in canvas):
        raise ValueError(f"data.canvas_size {canvas} must be a multiple of the coarsest stride {stride}")


def load(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """get_config() of a config file (configs/*.py), as --config=PATH gives it on the command line."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"config_file_{path.stem}", path)
    if spec is None:
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
