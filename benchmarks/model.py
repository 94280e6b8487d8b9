"""R50-FPN Mask R-CNN or Keypoint R-CNN, ours next to torchvision's maskrcnn_resnet50_fpn or keypointrcnn_resnet50_fpn
with the same weights: torchvision's seeded random initialisation, converted into ours by maskrcnn_jax.convert. Same
800x1344 input, batch 1. Each side runs in its own subprocess so that peak memory is its own, and the sides alternate
over a few rounds so that load from elsewhere on a shared machine does not fall on one side only.

    .venv/bin/python benchmarks/model.py            # Mask R-CNN: prints a table and rewrites its section of RESULTS.md
    .venv/bin/python benchmarks/model.py --model=keypointrcnn --repeats=2 --rounds=2
                                                    # Keypoint R-CNN: the same, in its own section
    .venv/bin/python benchmarks/model.py --backbones --repeats=2 --rounds=1
                                                    # ours only: inference of the paper's Table 2a backbones

Ours runs the config file of torchvision's model (MODELS: RoIAlign aligned=False, RPN 1000/1000 at test and
2000/2000 in training, ...). On both sides every backbone stage trains, and the score threshold is 0, so that random
weights still give many detections and the mask or keypoint head does full work.

--backbones times our inference of the Table 2a config files (BACKBONE_CONFIGS: R50-FPN, R50-C4, R101-C4 as
detectron2 builds them, 1000 proposals at test), on the same input with a score threshold of 0, and writes its own
section of RESULTS.md. torchvision has no C4 model, so there is no other side. The paper notes R101-C4's heavy box
head: res5 runs on every one of the 1000 proposals, and again on the 100 detections for their masks.
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

HEIGHT, WIDTH = 800, 1344
NUM_INSTANCES = 5
NUM_KEYPOINTS = 17
TOP_BOXES = 10  # the top detections whose boxes the two sides compare
ROOT = pathlib.Path(__file__).resolve().parent.parent


class Model(NamedTuple):
    title: str
    torchvision_class: str  # in torchvision.models.detection
    num_classes: int
    config_file: str  # ours: the config of torchvision's model
    section: str  # of RESULTS.md


MODELS = {
    "maskrcnn": Model("R50-FPN Mask R-CNN", "MaskRCNN", 91, "configs/torchvision_maskrcnn_r50_fpn.py", "model"),
    "keypointrcnn": Model("R50-FPN Keypoint R-CNN", "KeypointRCNN", 2, "configs/torchvision_keypointrcnn_r50_fpn.py",
                          "model_keypointrcnn"),
}
# label -> config file of the paper's Table 2a rows that --backbones times
BACKBONE_CONFIGS = {
    "R50-FPN": "configs/coco_r50_fpn_1x.py",
    "R50-C4": "configs/coco_r50_c4_1x.py",
    "R101-C4": "configs/coco_r101_c4_1x.py",
}


def test_inputs(model_name, height=HEIGHT, width=WIDTH):
    """The image (H x W x 3, RGB in [0, 1], as torchvision's model takes it) and NUM_INSTANCES ground-truth instances
    in torchvision's target format: boxes and labels, with box-filling masks for Mask R-CNN, or people (label 1) with
    NUM_KEYPOINTS visible keypoints inside their boxes for Keypoint R-CNN."""
    import numpy as np

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (height, width, 3)).astype(np.float32)
    largest = min(300, min(height, width) // 2)  # boxes 60-300 px at the benchmark's size
    xy = rng.uniform(0, [width - largest, height - largest], (NUM_INSTANCES, 2))
    wh = rng.uniform(largest / 5, largest, (NUM_INSTANCES, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    if model_name == "keypointrcnn":
        points = xy[:, None] + wh[:, None] * rng.uniform(0, 1, (NUM_INSTANCES, NUM_KEYPOINTS, 2))
        visibility = np.full((NUM_INSTANCES, NUM_KEYPOINTS, 1), 2.0)
        keypoints = np.concatenate([points, visibility], axis=-1).astype(np.float32)
        return image, {"boxes": boxes, "labels": np.ones(NUM_INSTANCES, np.int64), "keypoints": keypoints}
    masks = np.zeros((NUM_INSTANCES, height, width), np.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
        mask[y1:y2, x1:x2] = 1
    return image, {"boxes": boxes, "labels": rng.integers(1, 91, NUM_INSTANCES), "masks": masks}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats):
    """Wall times of `repeats` calls of `fn`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def our_config(model_name):
    """Our config of torchvision's model, with every backbone stage trainable and a score threshold of 0, as on
    torchvision's side."""
    from maskrcnn_jax import config as config_lib

    config = config_lib.load(ROOT / MODELS[model_name].config_file)
    config.model.backbone.freeze_at = 0
    config.model.detection.score_threshold = 0.0
    return config


def torchvision_model(model_name):
    """torchvision's model with seeded random weights: the structure of maskrcnn_resnet50_fpn or
    keypointrcnn_resnet50_fpn with the FrozenBatchNorm they use for pretrained weights (their weights=None build
    switches to BatchNorm2d), every stage trainable, and min/max size equal to the input, so that its transform does
    not resize it."""
    import torch
    from torchvision.models import detection
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=5
    )
    spec = MODELS[model_name]
    return getattr(detection, spec.torchvision_class)(
        backbone, num_classes=spec.num_classes, min_size=HEIGHT, max_size=WIDTH, box_score_thresh=0.0
    )


def write_shared_weights(model_name, weights_dir):
    """torchvision's weights (torchvision.pth) and the same weights converted into ours (ours.npz) in `weights_dir`."""
    import flax
    import numpy as np
    import torch

    from maskrcnn_jax.convert import from_torchvision

    state_dict = torchvision_model(model_name).state_dict()
    torch.save(state_dict, weights_dir / "torchvision.pth")
    np.savez(weights_dir / "ours.npz", **flax.traverse_util.flatten_dict(from_torchvision(state_dict), sep="/"))


def our_batch(model_name, config, height=HEIGHT, width=WIDTH):
    """test_inputs as our train step takes them: the normalised image batch, boxes, classes and crop-size masks."""
    import numpy as np

    from maskrcnn_jax import ops

    pixels, instances = test_inputs(model_name, height, width)
    # torchvision's normalisation, which its model applies to the [0, 1] image (ours takes the normalised image)
    mean, std = np.asarray(config.data.pixel_mean), np.asarray(config.data.pixel_std)
    boxes = instances["boxes"]
    batch = {
        "image": ((pixels * 255 - mean) / std)[None].astype(np.float32),
        "image_size": np.array([[height, width]], np.int32),
        "gt_boxes": boxes[None],
        "gt_classes": instances["labels"][None].astype(np.int32),
        "gt_is_crowd": np.zeros((1, NUM_INSTANCES), bool),
        "gt_valid": np.ones((1, NUM_INSTANCES), bool),
    }
    if "masks" in instances:
        batch["gt_masks"] = np.asarray(ops.crop_masks_to_boxes(instances["masks"], boxes, 112))[None]
    if "keypoints" in instances:
        batch["gt_keypoints"] = instances["keypoints"][None]
    return batch


def our_train_step(model):
    """(the jitted step (variables, opt_state, batch, key) -> (variables, opt_state, loss), its optimizer): SGD with
    momentum, as torchvision's reference recipe; the variables and optimizer state are donated."""
    import jax
    import optax

    from maskrcnn_jax.layers.compile_options import compiler_options

    optimizer = optax.sgd(0.01, momentum=0.9)

    def train_step(variables, opt_state, batch, key):
        params = variables["params"]

        def loss_fn(params):
            return model.apply({**variables, "params": params}, batch, key, method=model.losses)

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return {**variables, "params": optax.apply_updates(params, updates)}, opt_state, loss

    return jax.jit(train_step, donate_argnums=(0, 1), compiler_options=compiler_options()), optimizer


def run_ours(model_name, weights_dir, repeats):
    import flax
    import jax
    import numpy as np

    from maskrcnn_jax.layers.compile_options import compiler_options
    from maskrcnn_jax.layers.host_memory import compile_ahead
    from maskrcnn_jax.modeling import build_model
    from maskrcnn_jax.serving.keypoints import heatmaps_to_keypoints

    config = our_config(model_name)
    model = build_model(config.model)
    batch = our_batch(model_name, config)
    image, sizes = batch["image"], batch["image_size"]
    with np.load(weights_dir / "ours.npz") as weights:
        variables = jax.device_put(flax.traverse_util.unflatten_dict(dict(weights), sep="/"))
    train_step, optimizer = our_train_step(model)
    predict = jax.jit(lambda v, x, s: model.apply(v, x, s, method=model.predict), compiler_options=compiler_options())
    opt_state = optimizer.init(variables["params"])
    key = jax.random.key(1)

    # As train.py and the Predictor do: compiled before the first run, the compiler's freed memory released.
    start = time.perf_counter()
    compile_ahead(train_step, variables, opt_state, batch, key)
    train_compile = time.perf_counter() - start
    start = time.perf_counter()
    compile_ahead(predict, variables, image, sizes)
    predict_compile = time.perf_counter() - start

    def decode_keypoints(out):
        """torchvision decodes its heatmaps inside the model; ours are decoded on the host, as the Predictor does."""
        valid = np.asarray(out["valid"][0])
        return heatmaps_to_keypoints(np.asarray(out["keypoint_heatmaps"][0])[valid], np.asarray(out["boxes"][0])[valid])

    def infer():
        out = jax.block_until_ready(predict(variables, image, sizes))
        if config.model.keypoint_on:
            decode_keypoints(out)
        return out

    out = infer()
    valid = np.asarray(out["valid"][0])
    infer_times = timed(infer, repeats)
    host_decode = timed(lambda: decode_keypoints(out), repeats) if config.model.keypoint_on else None

    state = [variables, opt_state]

    def one_step():
        state[0], state[1], loss = train_step(state[0], state[1], batch, key)
        jax.block_until_ready(loss)

    one_step()
    train = timed(one_step, repeats)
    return {
        "train_compile_s": train_compile,
        "predict_compile_s": predict_compile,
        "train_step_s": train,
        "inference_s": infer_times,
        "host_decode_s": host_decode,
        "detections": int(valid.sum()),
        "top_boxes": np.asarray(out["boxes"][0])[valid][:TOP_BOXES].tolist(),
        "peak_rss_mb": peak_rss_mb(),
    }


# Random weights with identity FrozenBN grow activations with every residual block: ResNet-101's 23 res4 blocks
# reach 1e4-1e5, and R101-C4's deltas then push every proposal off the image (no detection at all, so the RPN's
# NMS and the detections do less work than on a trained model). Scaling the last norm of each residual branch,
# as torchvision's zero_init_residual does with 0, keeps every model's outputs in range; the work is the same.
RESIDUAL_NORM_SCALE = 0.1


def damp_residual_branches(variables, scale=RESIDUAL_NORM_SCALE):
    """`variables` with the weight of every bottleneck's last norm (bn3) multiplied by `scale`."""
    import flax

    damped = {}
    for collection, tree in variables.items():
        flat = flax.traverse_util.flatten_dict(tree)
        damped[collection] = flax.traverse_util.unflatten_dict(
            {path: value * scale if path[-2:] == ("bn3", "weight") else value for path, value in flat.items()})
    return damped


def run_ours_inference(config_file, repeats):
    """Compile and steady-state inference times of the model a config file describes, on one random image."""
    import jax
    import numpy as np

    from maskrcnn_jax import config as config_lib
    from maskrcnn_jax.layers.compile_options import compiler_options
    from maskrcnn_jax.modeling import build_model

    config = config_lib.load(ROOT / config_file).model
    config.detection.score_threshold = 0.0
    model = build_model(config)
    image = np.random.default_rng(0).standard_normal((1, HEIGHT, WIDTH, 3)).astype(np.float32)
    sizes = np.array([[HEIGHT, WIDTH]], np.int32)
    variables = damp_residual_branches(jax.jit(model.init)(jax.random.key(0), image, sizes))
    predict = jax.jit(lambda v, x, s: model.apply(v, x, s, method=model.predict), compiler_options=compiler_options())
    start = time.perf_counter()
    compiled = predict.lower(variables, image, sizes).compile()
    compile_seconds = time.perf_counter() - start
    out = compiled(variables, image, sizes)
    jax.block_until_ready(out)
    cpu_start = time.process_time()
    wall = timed(lambda: jax.block_until_ready(compiled(variables, image, sizes)), repeats)
    return {
        "predict_compile_s": compile_seconds,
        "inference_s": wall,
        # CPU seconds of all the process' threads per call: less sensitive than wall time to other jobs' load
        "inference_cpu_s": (time.process_time() - cpu_start) / repeats,
        "detections": int(np.asarray(out["valid"]).sum()),
        "finite": bool(all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out))),
        "mask_size": int(out["masks"].shape[-1]),
        "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"])),
        "peak_rss_mb": peak_rss_mb(),
        "load_average": os.getloadavg()[0],  # the machine is shared: other jobs' load lands on the times
    }


def backbones(repeats, rounds):
    """--backbones: each Table 2a config in its own process, alternating over the rounds; a new RESULTS.md section."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from timing import head_commit, machine_line, write_section

    commit = head_commit()
    results = {label: [] for label in BACKBONE_CONFIGS}
    for round_index in range(rounds):
        for label, config_file in BACKBONE_CONFIGS.items():
            results[label].append(run_side("--side=ours_inference", f"--config_file={config_file}",
                                           f"--repeats={repeats}"))
            print(f"round {round_index + 1} {label}", results[label][-1], flush=True)

    def median(label):
        return statistics.median([t for result in results[label] for t in result["inference_s"]])

    def cpu(label):
        return statistics.median(result["inference_cpu_s"] for result in results[label])

    table = ["| model | config | parameters | masks | detections | inference (s) | / R50-FPN | CPU (s) | / R50-FPN "
             "| compile (s) | peak RSS (MB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, config_file in BACKBONE_CONFIGS.items():
        last = results[label][-1]
        table.append(
            f"| {label} | `{config_file}` | {last['parameters']:,} | {last['mask_size']}x{last['mask_size']} "
            f"| {last['detections']} | {median(label):.2f} | {median(label) / median('R50-FPN'):.2f} "
            f"| {cpu(label):.1f} | {cpu(label) / cpu('R50-FPN'):.2f} | {last['predict_compile_s']:.1f} "
            f"| {max(r['peak_rss_mb'] for r in results[label]):.0f} |")
    def per_round(label, key):
        return ", ".join(f"{statistics.median(r[key]) if isinstance(r[key], list) else r[key]:.2f}"
                         for r in results[label])

    rounds_lines = [f"- {label}: inference medians per round {per_round(label, 'inference_s')} s, 1-minute load "
                    f"average after each {per_round(label, 'load_average')}" for label in BACKBONE_CONFIGS]
    body = "\n".join([
        "## model backbones (`benchmarks/model.py --backbones`)",
        "",
        f"Command: `.venv/bin/python benchmarks/model.py --backbones --repeats={repeats} --rounds={rounds}` "
        f"(rewrites this section), at commit {commit}.",
        f"Machine: {machine_line()}.",
        "Our inference only (torchvision has no C4 model): the paper's Table 2a models as their config files build",
        "them (detectron2's settings, 81 classes, 1000 proposals at test), random weights, one "
        f"{HEIGHT}x{WIDTH} image,",
        "score threshold 0 (100 detections, so every mask head does full work), the last norm of every residual branch",
        f"scaled by {RESIDUAL_NORM_SCALE} (`damp_residual_branches`: random ResNet-101 activations otherwise overflow",
        "and R101-C4 finds nothing). Each model runs in its own process; times are medians over every timed call of",
        "every round, compile excluded. CPU is the process' CPU seconds (all threads) per call, median over the",
        "rounds: less sensitive than wall time to other jobs on this shared machine.",
        "",
        *table,
        "",
        *rounds_lines,
        "",
        "C4 runs res5 (three bottleneck blocks, 1024 -> 2048 channels on 14 x 14 -> 7 x 7) on each of the 1000",
        "proposals, and again on the 100 detections for their masks; FPN's box head is two FC layers. The paper's",
        "timing paragraph quotes R101-FPN at 195 ms per image on an M40 GPU and R101-C4 at about 400 ms, \"as it has a",
        "heavier box head\".",
    ])
    write_section("model_backbones", body)


def run_torchvision(model_name, weights_dir, repeats):
    import torch

    model = torchvision_model(model_name)
    model.load_state_dict(torch.load(weights_dir / "torchvision.pth", weights_only=True))
    pixels, instances = test_inputs(model_name)
    image = torch.from_numpy(pixels.transpose(2, 0, 1).copy())
    target = {name: torch.from_numpy(value) for name, value in instances.items()}

    model.eval()
    with torch.inference_mode():
        boxes = model([image])[0]["boxes"]
        infer = timed(lambda: model([image]), repeats)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    head_rois = []
    head = model.roi_heads.keypoint_head if model.roi_heads.has_keypoint() else model.roi_heads.mask_head
    head.register_forward_hook(lambda module, inputs, output: head_rois.append(len(output)))

    def one_step():
        losses = model([image], [target])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    one_step()
    train = timed(one_step, repeats)
    return {
        "train_step_s": train,
        "inference_s": infer,
        "detections": len(boxes),
        "top_boxes": boxes[:TOP_BOXES].tolist(),
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "head_rois": head_rois[-1],
    }


def run_side(*args):
    """This script run with `args` in a new process: the result it prints."""
    out = subprocess.run([sys.executable, __file__, *args], check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.split("RESULT ", 1)[1])


def compare(model_name, repeats, rounds):
    """Ours against torchvision's `model_name`, with the same weights, alternating over the rounds; rewrites the
    model's section of RESULTS.md."""
    spec = MODELS[model_name]
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from timing import head_commit, machine_line, write_section

    commit = head_commit()
    results = {"ours": [], "torchvision": []}
    with tempfile.TemporaryDirectory() as weights_dir:
        subprocess.run([sys.executable, __file__, "--side=weights", f"--model={model_name}",
                        f"--weights_dir={weights_dir}"], check=True)
        for round_index in range(rounds):
            for side in results:
                results[side].append(run_side(f"--side={side}", f"--model={model_name}",
                                              f"--weights_dir={weights_dir}", f"--repeats={repeats}"))
                print(f"round {round_index + 1} {side}", results[side][-1], flush=True)

    def pooled(side, key):
        return statistics.median([t for result in results[side] for t in result[key]])

    ours, theirs = results["ours"][-1], results["torchvision"][-1]
    rows = [
        ("train step (s)", pooled("ours", "train_step_s"), pooled("torchvision", "train_step_s")),
        ("inference (s)", pooled("ours", "inference_s"), pooled("torchvision", "inference_s")),
        ("peak RSS of the process (MB)", max(r["peak_rss_mb"] for r in results["ours"]),
         max(r["peak_rss_mb"] for r in results["torchvision"])),
    ]
    table = ["| measure | ours | torchvision | ours / torchvision |", "| --- | ---: | ---: | ---: |"]
    table += [f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f} |" for name, a, b in rows]

    def per_round(side):
        return ", ".join(f"{statistics.median(r['train_step_s']):.2f}" for r in results[side])

    compared = min(len(ours["top_boxes"]), len(theirs["top_boxes"]))
    box_difference = max(abs(a - b) for our_box, their_box in zip(ours["top_boxes"], theirs["top_boxes"])
                         for a, b in zip(our_box, their_box))
    if model_name == "keypointrcnn":
        head, ground_truth = "keypoint head", f"{NUM_INSTANCES} ground-truth people with {NUM_KEYPOINTS} keypoints each"
        outputs = ("Both sides' inference ends in keypoints: torchvision decodes the heatmaps inside its model, ours "
                   "on the host (serving/keypoints.py, as the Predictor does: "
                   f"{statistics.median(ours['host_decode_s']):.2f} s of our time).")
    else:
        head, ground_truth = "mask head", f"{NUM_INSTANCES} ground-truth instances"
        outputs = ("torchvision's inference also pastes the masks into the image (its postprocess); ours ends at the "
                   "28x28 masks.")
    command = f".venv/bin/python benchmarks/model.py --model={model_name} --repeats={repeats} --rounds={rounds}"
    body = "\n".join([
        f"## {spec.title} (`benchmarks/model.py --model={model_name}`)",
        "",
        f"Command: `{command}` (rewrites this section), at commit {commit}.",
        f"Machine: {machine_line()}.",
        f"{spec.title}, one {HEIGHT}x{WIDTH} image, {ground_truth}, SGD with momentum, batch 1.",
        "Both sides run the same weights: torchvision's seeded random initialisation (FrozenBatchNorm, every stage",
        f"trainable), converted into ours by `maskrcnn_jax.convert.from_torchvision`; ours runs `{spec.config_file}`",
        "with backbone.freeze_at 0, and both use a score threshold of 0. Each side runs in its own process,",
        "alternating over the rounds; times are medians over every timed call of every round.",
        f"Detections: ours {ours['detections']}, torchvision {theirs['detections']}; the top {compared} boxes differ "
        f"by at most {box_difference:.3g} px.",
        f"Our compile times: train step {ours['train_compile_s']:.1f} s, inference {ours['predict_compile_s']:.1f} s"
        " (torchvision runs eagerly).",
        f"Train-step medians per round: ours {per_round('ours')} s; torchvision {per_round('torchvision')} s.",
        f"With random weights torchvision's {head} trains on {theirs['head_rois']} RoIs (the positives);"
        " ours on the smallest of 16/32/64/128 that holds them (`roi_heads.mask_roi_buckets`).",
        outputs,
        "",
        *table,
    ])
    write_section(spec.section, body)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=list(MODELS), default="maskrcnn",
                        help="the model compared with torchvision's (MODELS)")
    parser.add_argument("--side", choices=["ours", "torchvision", "weights", "ours_inference"],
                        help="one process of a run (weights: write the shared weights into --weights_dir)")
    parser.add_argument("--weights_dir", type=pathlib.Path, help="--side=ours/torchvision/weights: the shared weights")
    parser.add_argument("--backbones", action="store_true",
                        help="time our inference of the Table 2a configs (BACKBONE_CONFIGS) instead")
    parser.add_argument("--config_file", help="--side=ours_inference: the config file of the model to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side per round")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of (ours, torchvision) subprocesses; the sides alternate so that a burst of "
                             "load on a shared machine does not land on one side only")
    args = parser.parse_args()
    if args.side == "weights":
        write_shared_weights(args.model, args.weights_dir)
    elif args.side:
        if args.side == "ours_inference":
            result = run_ours_inference(args.config_file, args.repeats)
        else:
            run = run_ours if args.side == "ours" else run_torchvision
            result = run(args.model, args.weights_dir, args.repeats)
        print("RESULT " + json.dumps(result))
    elif args.backbones:
        backbones(args.repeats, args.rounds)
    else:
        compare(args.model, args.repeats, args.rounds)


if __name__ == "__main__":
    main()
