"""The `make demo` recipe (configs/shapes.py) trained by ours and by its torchvision twin on the same generated shapes,
seconds per step side by side, with where each side's time goes.

    .venv/bin/python benchmarks/demo_twin.py                  # both sides; prints the section
    .venv/bin/python benchmarks/demo_twin.py --write          # and replaces its section of benchmarks/RESULTS.md
    .venv/bin/python benchmarks/demo_twin.py --sides=torchvision --num_train=8 --warmup=1 --steps=1   # dry run

The twin is torchvision.models.detection.MaskRCNN built from its own pieces with every value read from
configs/shapes.py: ResNet-`backbone.depth` (torchvision.models.resnet18, no pretrained weights) with GroupNorm of 32
groups in place of every BatchNorm and every stage trained (backbone.freeze_at 0); BackboneWithFPN over layer1-4
with `fpn_channels` channels and LastLevelMaxPool (P6), FPN convs with bias and no norm, as ours; one anchor size per
level (`anchors.sizes`) with `anchors.aspect_ratios`; RPNHead (one 3x3 conv); RPN top-k before and after NMS at
train and test, NMS threshold, IoU thresholds, sampled anchors and positive fraction from `rpn`; MultiScaleRoIAlign
over P2-P5 at `box_pool_size` and `mask_pool_size` with `sampling_ratio`; TwoMLPHead of `fc_dim`; MaskRCNNHeads of
`mask_num_convs` 3x3 convs of `mask_conv_dim` channels; MaskRCNNPredictor (2x2 transposed conv of `mask_conv_dim`
channels, ReLU, 1x1 conv); RoI sampling, box weights (10, 10, 5, 5) and detection settings from `roi_heads` and
`detection`. Images are resized to fit the `canvas_size` square (min_size = max_size = its side, which is the same
scale as ours) and every batch is padded to that canvas (size_divisible = its side), so both sides run the same
192x192 batches of `train.batch_size` images, flipped at random as ours are. ImageNet mean and std on both sides.
The recipe: AdamW (betas 0.9, 0.999, eps 1e-8) with decoupled weight decay `weight_decay` on conv and linear weights
only (`weight_decay_bias` and `weight_decay_norm` are 0), gradients clipped to a global norm of `grad_clip_norm`,
and the learning rate `base_lr` with the linear warmup from `warmup_factor` over `warmup_steps` and the decay by
`lr_gamma` at `lr_steps`, per step, as engine/optim.py gives it.

What torchvision cannot mirror (none of it changes the work of a step by much):
  - RoIAlign: torchvision's MultiScaleRoIAlign has no `aligned` switch and samples without the half-pixel offset;
    ours uses `roi_heads.aligned` (True). Same number of samples.
  - Losses: torchvision's RPN and box regression use smooth-L1 with beta 1/9, the RPN's objectness and box losses
    are averaged over the sampled anchors; ours follows detectron2 (L1, beta 0, divided by images x sampled anchors).
  - The mask head: torchvision runs it on exactly the positive RoIs of the batch; ours on the smallest of
    `mask_roi_buckets` fixed prefixes of the sampled RoIs that holds them (static shapes).
  - torchvision rounds its base anchors to whole pixels; ours keeps them exact. Inference only: ours keeps the
    `detection.pre_nms_topk` best candidates before NMS, torchvision has no such cap.
  - Our step also skips an update whose loss or gradient is not finite (a few elementwise selects).
  - Initialisations differ in the heads (each side its own defaults).

Data: synthetic.generate writes the shapes (the demo's generator and options, `--num_train` images) as COCO JSON +
JPEGs. Ours builds them into TFDS records (untimed, as `make demo` does once) and reads them with the input pipeline
(pipeline.train_dataset: decode, resize, flip, pad as uint8, crop masks to their boxes, in tf.data's threads), then
sends each batch to the device two steps ahead (engine.parallel.device_batches) and runs train.jit_train_step: the
loop of train.train_and_evaluate, without the progress log and checkpoints. The twin loads each image with PIL,
decodes its polygons into masks with pycocotools and flips, in the training loop itself, then takes the step
(forward, backward, clipping, AdamW, schedule).

Each side runs in its own process, sides alternating over --rounds. Each times, after --warmup steps (ours: the first
one compiles, its time is reported apart):
  - loop: --steps steps of the training loop as above (data and step together), wall seconds per step;
  - step alone: --steps steps on a few batches already loaded (ours: already on the device), no input work;
  - backbone alone: the gradient of the sum of P2-P6 with respect to the parameters, on one loaded batch (ours:
    normalised outside; the twin: after its transform), the step's share that the backbone takes;
  - input alone: --steps batches of the input side only (ours: a fresh tf.data iterator, after --warmup batches,
    read as fast as it gives them; the twin: PIL, masks and flips).
Each also gives the CPU seconds of all its threads per step (process time), to see how much of the 2 cores it uses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIG = os.path.join(ROOT, "configs", "shapes.py")
SIDES = ("ours", "torchvision")
CACHED_BATCHES = 4  # "step alone" cycles through this many loaded batches


def load_config():
    from maskrcnn_jax import config as config_lib

    return config_lib.load(CONFIG)


def timed_phase(run_once, count):
    """(wall seconds, CPU seconds of the whole process) per call, over `count` calls of `run_once`."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        run_once()
    return (time.perf_counter() - wall) / count, (time.process_time() - cpu) / count


# ----------------------------------------------------------------------------------------------------
# Ours.


def run_ours(sources, config, warmup, steps, data_threads):
    import jax
    import jax.numpy as jnp
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from maskrcnn_jax import ops, train
    from maskrcnn_jax.data import coco_dataset, pipeline
    from maskrcnn_jax.data.options import InputOptions
    from maskrcnn_jax.engine import checkpointing, parallel
    from maskrcnn_jax.layers.compile_options import compiler_options
    from maskrcnn_jax.modeling import build_model

    builder = coco_dataset.build(sources)
    mesh = parallel.make_mesh()
    model = build_model(config.model)
    state, tx = checkpointing.create_train_state(config, model)
    state = parallel.replicate(state, mesh)
    step_fn = train.jit_train_step(model, tx, config, mesh)
    inputs = train.model_inputs(config.model)
    dataset = pipeline.train_dataset(builder, InputOptions.from_config(config.data),
                                     batch_size=config.train.batch_size, seed=config.data.seed)
    if data_threads:
        options = tf.data.Options()
        options.threading.private_threadpool_size = data_threads
        dataset = dataset.with_options(options)
    local_batches = iter(tfds.as_numpy(dataset))
    box = {"state": state}

    def step(batch):
        box["state"], _ = step_fn(box["state"], batch)

    def timed_steps(next_batch, count):
        """timed_phase over `count` steps, waiting for the last one, so the time is the loop's throughput."""
        calls = iter(range(count))

        def one():
            step(next_batch())
            if next(calls) == count - 1:
                jax.block_until_ready(box["state"])

        return timed_phase(one, count)

    def loop_phase(count):
        batches = parallel.device_batches(local_batches, count, mesh, inputs)
        return timed_steps(lambda: next(batches)[1], count)

    compile_and_first_step = loop_phase(1)[0]
    if warmup:
        loop_phase(warmup)
    loop = loop_phase(steps)
    cached = [parallel.global_batch(next(local_batches), mesh, inputs) for _ in range(CACHED_BATCHES)]
    jax.block_until_ready(cached)
    position = iter(range(steps))
    step_alone = timed_steps(lambda: cached[next(position) % CACHED_BATCHES], steps)

    def backbone_sum(params, images):
        levels = model.apply({"params": params, "batch_stats": box["state"].batch_stats}, images, True,
                             method=lambda module, x, train: module._features(x, train))
        return sum(jnp.sum(level) for level in levels)

    backbone_grad = jax.jit(jax.grad(backbone_sum), compiler_options=compiler_options())
    images = ops.normalize_canvas(cached[0]["image"], cached[0]["image_size"], config.data.pixel_mean,
                                  config.data.pixel_std)
    jax.block_until_ready(backbone_grad(box["state"].params, images))
    backbone_alone = timed_phase(lambda: jax.block_until_ready(backbone_grad(box["state"].params, images)), steps)
    # A fresh iterator, read as fast as it goes: the old one filled its prefetch buffer while the steps ran alone.
    fresh_batches = iter(tfds.as_numpy(dataset))
    for _ in range(warmup):
        next(fresh_batches)
    input_alone = timed_phase(lambda: next(fresh_batches), steps)
    return {"compile_and_first_step_s": compile_and_first_step, "loop": loop, "step_alone": step_alone,
            "backbone_alone": backbone_alone, "input_alone": input_alone,
            "threads": f"XLA's pool on {os.cpu_count()} cores, tf.data {data_threads or 'autotuned'}"}


# ----------------------------------------------------------------------------------------------------
# The torchvision twin.


NORM_GROUPS = 32  # layers/norm.py's GroupNorm


def build_twin(config):
    """torchvision's MaskRCNN with configs/shapes.py's architecture (see the module doc)."""
    import torch
    import torchvision
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    m = config.model
    b, a, rpn, r, d = m.backbone, m.anchors, m.rpn, m.roi_heads, m.detection
    mirrored = {
        "backbone.kind": (b.kind, "fpn"), "backbone.norm": (b.norm, "gn"), "backbone.freeze_at": (b.freeze_at, 0),
        "backbone.groups": (b.groups, 1), "anchors.strides": (tuple(a.strides), (4, 8, 16, 32, 64)),
        "roi_heads.pool_strides": (tuple(r.pool_strides), (4, 8, 16, 32)), "roi_heads.roi_op": (r.roi_op, "align"),
        "roi_heads.mask_head": (r.mask_head, "fcn"), "roi_heads.mask_loss": (r.mask_loss, "sigmoid"),
        "roi_heads.class_agnostic_mask": (r.class_agnostic_mask, False), "mask_on": (m.mask_on, True),
        "keypoint_on": (m.keypoint_on, False), "dtype": (m.dtype, "float32"),
        "data.canvas_size": (config.data.canvas_size[0], config.data.canvas_size[1]),
        "data.scale_jitter": (tuple(config.data.scale_jitter), (1.0, 1.0)),
        "train.optimizer": (config.train.optimizer, "adamw"), "train.lr_schedule": (config.train.lr_schedule,
                                                                                    "multistep"),
        "train.ema_decay": (config.train.ema_decay, 0.0),
    }
    for name, (value, twin_value) in mirrored.items():
        if value != twin_value:
            raise NotImplementedError(f"the twin mirrors {name} = {twin_value!r} only; the config has {value!r}")

    body = getattr(torchvision.models, f"resnet{b.depth}")(
        weights=None, norm_layer=lambda channels: torch.nn.GroupNorm(NORM_GROUPS, channels))
    stage_channels = [64 * 2**i * body.layer1[0].expansion for i in range(4)]
    backbone = BackboneWithFPN(body, {f"layer{i + 1}": str(i) for i in range(4)}, stage_channels, b.fpn_channels,
                               extra_blocks=LastLevelMaxPool())
    levels = [str(i) for i in range(len(r.pool_strides))]
    canvas = config.data.canvas_size[0]
    num_anchors = len(a.aspect_ratios)
    mask_dim = r.mask_conv_dim
    return MaskRCNN(
        backbone,
        min_size=canvas, max_size=canvas, size_divisible=canvas,
        image_mean=[v / 255 for v in config.data.pixel_mean], image_std=[v / 255 for v in config.data.pixel_std],
        rpn_anchor_generator=AnchorGenerator(tuple((size,) for size in a.sizes),
                                             (tuple(a.aspect_ratios),) * len(a.sizes)),
        rpn_head=RPNHead(b.fpn_channels, num_anchors),
        rpn_pre_nms_top_n_train=rpn.pre_nms_topk_train, rpn_pre_nms_top_n_test=rpn.pre_nms_topk_test,
        rpn_post_nms_top_n_train=rpn.post_nms_topk_train, rpn_post_nms_top_n_test=rpn.post_nms_topk_test,
        rpn_nms_thresh=rpn.nms_threshold, rpn_bg_iou_thresh=rpn.iou_thresholds[0],
        rpn_fg_iou_thresh=rpn.iou_thresholds[1], rpn_batch_size_per_image=rpn.batch_size_per_image,
        rpn_positive_fraction=rpn.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(levels, r.box_pool_size, r.sampling_ratio),
        box_head=TwoMLPHead(b.fpn_channels * r.box_pool_size**2, r.fc_dim),
        box_predictor=FastRCNNPredictor(r.fc_dim, m.num_classes),
        box_score_thresh=d.score_threshold, box_nms_thresh=d.nms_threshold,
        box_detections_per_img=d.detections_per_image,
        box_fg_iou_thresh=r.iou_threshold, box_bg_iou_thresh=r.iou_threshold,
        box_batch_size_per_image=r.batch_size_per_image, box_positive_fraction=r.positive_fraction,
        mask_roi_pool=MultiScaleRoIAlign(levels, r.mask_pool_size, r.sampling_ratio),
        mask_head=MaskRCNNHeads(b.fpn_channels, [mask_dim] * r.mask_num_convs, 1),
        mask_predictor=MaskRCNNPredictor(mask_dim, mask_dim, m.num_classes),
    )


def twin_optimizer(model, train_config):
    """AdamW with decay on conv and linear weights only, and engine/optim.py's multistep schedule per step."""
    import torch

    t = train_config
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]  # biases and GroupNorm scales and shifts
    if t.weight_decay_bias or t.weight_decay_norm:
        raise NotImplementedError("the twin decays conv and linear weights only")
    optimizer = torch.optim.AdamW([{"params": weights, "weight_decay": t.weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=t.base_lr)

    def factor(step):
        warmup = 1.0
        if step < t.warmup_steps:
            alpha = step / t.warmup_steps
            warmup = t.warmup_factor * (1 - alpha) + alpha
        return warmup * t.lr_gamma ** sum(step >= boundary for boundary in t.lr_steps)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ShapesBatches:
    """Training batches of a generated COCO folder, read in the training loop: PIL decodes each JPEG, pycocotools
    turns its polygons into masks, and a coin flips image, masks and boxes; shuffled anew every epoch."""

    def __init__(self, json_path, images_dir, batch_size, seed):
        with open(json_path) as f:
            coco = json.load(f)
        self.images = coco["images"]
        self.annotations = {image["id"]: [] for image in self.images}
        for annotation in coco["annotations"]:
            self.annotations[annotation["image_id"]].append(annotation)
        self.images_dir = images_dir
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.order = []

    def example(self, image):
        import torch
        from PIL import Image
        from pycocotools import mask as mask_utils

        with Image.open(os.path.join(self.images_dir, image["file_name"])) as opened:
            pixels = np.array(opened.convert("RGB"))
        height, width = pixels.shape[:2]
        annotations = self.annotations[image["id"]]
        masks = np.zeros((len(annotations), height, width), np.uint8)
        for mask, annotation in zip(masks, annotations):
            mask[:] = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(annotation["segmentation"],
                                                                                height, width)))
        boxes = np.array([a["bbox"] for a in annotations], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        if self.rng.random() < 0.5:
            pixels, masks = pixels[:, ::-1], masks[:, :, ::-1]
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255)
        return tensor, {"boxes": torch.from_numpy(boxes),
                        "labels": torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64),
                        "masks": torch.from_numpy(np.ascontiguousarray(masks))}

    def __next__(self):
        if len(self.order) < self.batch_size:
            self.order = list(self.rng.permutation(len(self.images)))
        picked, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        images, targets = zip(*(self.example(self.images[i]) for i in picked))
        return list(images), list(targets)


def run_torchvision(paths, config, warmup, steps):
    import torch

    torch.manual_seed(config.train.seed)
    model = build_twin(config)
    model.train()
    optimizer, schedule = twin_optimizer(model, config.train)
    batches = ShapesBatches(paths["train_json"], paths["train_images"], config.train.batch_size, config.data.seed)

    def step(batch):
        images, targets = batch
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip_norm)
        optimizer.step()
        schedule.step()

    for _ in range(warmup):
        step(next(batches))
    loop = timed_phase(lambda: step(next(batches)), steps)
    cached = [next(batches) for _ in range(CACHED_BATCHES)]
    position = iter(range(steps))
    step_alone = timed_phase(lambda: step(cached[next(position) % CACHED_BATCHES]), steps)

    canvas = model.transform(*cached[0])[0].tensors

    def backbone_step():
        model.zero_grad(set_to_none=True)
        sum(level.sum() for level in model.backbone(canvas).values()).backward()

    backbone_step()
    backbone_alone = timed_phase(backbone_step, steps)
    input_alone = timed_phase(lambda: next(batches), steps)
    return {"loop": loop, "step_alone": step_alone, "backbone_alone": backbone_alone, "input_alone": input_alone,
            "threads": f"torch {torch.get_num_threads()} threads"}


# ----------------------------------------------------------------------------------------------------
# The report.


def median_pair(rounds, phase):
    return tuple(statistics.median(r[phase][i] for r in rounds) for i in range(2))


def report(args, results, commit, num_images):
    config = load_config()
    t = config.train
    sides = [side for side in SIDES if results[side]]
    lines = [
        "## Training at the demo's scale: ours and its torchvision twin (`benchmarks/demo_twin.py`)",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/demo_twin.py', *sys.argv[1:]])}` at commit {commit}.",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores. configs/shapes.py's model and recipe (ResNet-18 GN, "
        f"FPN {config.model.backbone.fpn_channels}, AdamW, batch {t.batch_size} at "
        f"{config.data.canvas_size[0]}x{config.data.canvas_size[1]}) on {num_images} generated shapes images; the "
        "twin is torchvision's MaskRCNN built to the same values (the script's docstring lists the few it cannot "
        f"mirror). Per side and round: {args.warmup} warm-up steps, then {args.steps} steps per phase; seconds "
        f"per step, medians over {args.rounds} round(s) with each side in its own process, sides alternating.",
        "",
        "| seconds per step (CPU seconds of the process per step) | " + " | ".join(sides)
        + (" | ours / torchvision |" if len(sides) == 2 else " |"),
        "| --- | " + " | ".join("---:" for _ in sides) + (" | ---: |" if len(sides) == 2 else " |"),
    ]
    names = {"loop": "training loop: input and step together (ours: tf.data in the background, two batches on "
                     "the device ahead; twin: PIL in the loop)",
             "step_alone": "step alone, on batches already loaded",
             "backbone_alone": "of which the backbone (ResNet-18 GN + FPN, P2-P6) forward and backward",
             "input_alone": "input alone, one batch"}
    for phase, name in names.items():
        pairs = {side: median_pair(results[side], phase) for side in sides}
        row = f"| {name} | " + " | ".join(f"{pairs[s][0]:.3f} ({pairs[s][1]:.2f})" for s in sides)
        if len(sides) == 2:
            row += f" | {pairs['ours'][0] / pairs['torchvision'][0]:.2f}"
        lines.append(row + " |")
    lines.append("")
    for side in sides:
        rounds = results[side]
        wall, cpu = median_pair(rounds, "loop")
        line = (f"{side}: {rounds[0]['threads']}; loop seconds per step by round: "
                + ", ".join(f"{r['loop'][0]:.3f}" for r in rounds)
                + f"; {t.batch_size / wall:.2f} images/s; {cpu / wall:.2f} cores busy in the loop")
        if side == "ours":
            compile_seconds = statistics.median(r["compile_and_first_step_s"] for r in rounds)
            line += (f"; compile and first step {compile_seconds:.1f} s; the demo's {t.num_steps} steps would take "
                     f"{t.num_steps * wall / 60:.1f} min of training loop here (without compile, checkpoints and "
                     "evaluation)")
        lines.append(line + ".")
    return "\n".join(lines)


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated: " + ", ".join(SIDES))
    parser.add_argument("--num_train", type=int, default=256, help="shapes images to generate")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per side (ours: after the compile)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps (or batches) per phase")
    parser.add_argument("--rounds", type=int, default=1, help="times each side runs, alternating")
    parser.add_argument("--data_threads", type=int, default=0,
                        help="ours: tf.data's thread pool size (0: the pipeline's own, autotuned)")
    parser.add_argument("--workdir", default=None, help="keep the generated data here (default: a temp dir)")
    parser.add_argument("--write", action="store_true", help="replace the section in benchmarks/RESULTS.md")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: one side's run, JSON out
    args = parser.parse_args()
    sides = args.sides.split(",")
    if set(sides) - set(SIDES):
        parser.error(f"--sides takes {', '.join(SIDES)}")

    if args.job:
        job = json.loads(args.job)
        config = load_config()
        if job["side"] == "ours":
            result = run_ours(job["sources"], config, args.warmup, args.steps, args.data_threads)
        else:
            result = run_torchvision(job["sources"], config, args.warmup, args.steps)
        print(json.dumps(result))
        return

    from maskrcnn_jax.data import synthetic

    config = load_config()
    workdir = args.workdir or tempfile.mkdtemp(prefix="maskrcnn_demo_twin_")
    shapes = config.data.shapes
    paths = synthetic.generate(os.path.join(workdir, "shapes"), num_train=args.num_train, num_val=0,
                               seed=shapes.seed)
    sources = {"name": f"shapes_twin_{args.num_train}", "data_dir": os.path.join(workdir, "tfds"), **paths,
               "val_json": None, "val_images": None}
    results = {side: [] for side in SIDES}
    for _ in range(args.rounds):
        for side in sides:
            command = [sys.executable, os.path.abspath(__file__), "--job=" + json.dumps({"side": side,
                                                                                        "sources": sources}),
                       f"--warmup={args.warmup}", f"--steps={args.steps}", f"--data_threads={args.data_threads}"]
            out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
            results[side].append(json.loads(out.strip().splitlines()[-1]))
            print(f"{side}: {results[side][-1]}", flush=True)

    from timing import head_commit

    commit = head_commit()
    section = report(args, results, commit, args.num_train)
    print("\n" + section)
    if args.write:
        from timing import write_section

        write_section("demo_twin", section)


if __name__ == "__main__":
    main()
