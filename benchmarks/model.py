"""Mask R-CNN R50-FPN, ours next to torchvision's maskrcnn_resnet50_fpn: same 800x1344 input, batch 1,
random weights. Each side runs in its own subprocess so that peak memory is its own, and the sides alternate over
a few rounds so that load from elsewhere on a shared machine does not fall on one side only.

    .venv/bin/python benchmarks/model.py            # prints a table and rewrites its section of RESULTS.md
    .venv/bin/python benchmarks/model.py --backbones --repeats=2 --rounds=1
                                                    # ours only: inference of the paper's Table 2a backbones

Both sides use torchvision's inference settings (RoIAlign aligned=False, RPN 1000/1000 at test and
2000/2000 in training) and a score threshold of 0, so that random weights still give 100 detections and
both mask heads do full work.

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
import time

HEIGHT, WIDTH = 800, 1344
NUM_INSTANCES = 5
ROOT = pathlib.Path(__file__).resolve().parent.parent
# label -> config file of the paper's Table 2a rows that --backbones times
BACKBONE_CONFIGS = {
    "R50-FPN": "configs/coco_r50_fpn_1x.py",
    "R50-C4": "configs/coco_r50_c4_1x.py",
    "R101-C4": "configs/coco_r101_c4_1x.py",
}


def ground_truth(rng):
    import numpy as np

    xy = rng.uniform(0, [WIDTH - 300, HEIGHT - 300], (NUM_INSTANCES, 2))
    wh = rng.uniform(60, 300, (NUM_INSTANCES, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    labels = rng.integers(1, 91, NUM_INSTANCES)
    masks = np.zeros((NUM_INSTANCES, HEIGHT, WIDTH), np.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
        mask[y1:y2, x1:x2] = 1
    return boxes, labels, masks


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


def run_ours(repeats):
    import jax
    import numpy as np
    import optax

    from maskrcnn_jax import ops
    from maskrcnn_jax.modeling import build_model, model_config

    config = model_config()
    config.backbone.freeze_at = 0
    config.roi_heads.aligned = False
    config.rpn.post_nms_topk_train = 2000
    config.detection.score_threshold = 0.0
    model = build_model(config)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, HEIGHT, WIDTH, 3)).astype(np.float32)
    sizes = np.array([[HEIGHT, WIDTH]], np.int32)
    boxes, labels, masks = ground_truth(rng)
    batch = {
        "image": image,
        "image_size": sizes,
        "gt_boxes": boxes[None],
        "gt_classes": labels[None].astype(np.int32),
        "gt_is_crowd": np.zeros((1, NUM_INSTANCES), bool),
        "gt_valid": np.ones((1, NUM_INSTANCES), bool),
        "gt_masks": np.asarray(ops.crop_masks_to_boxes(masks, boxes, 112))[None],
    }
    variables = jax.jit(model.init)(jax.random.key(0), image, sizes)
    optimizer = optax.sgd(0.01, momentum=0.9)

    def train_step(variables, opt_state, batch, key):
        params = variables["params"]

        def loss_fn(params):
            return model.apply({**variables, "params": params}, batch, key, method=model.losses)

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return {**variables, "params": optax.apply_updates(params, updates)}, opt_state, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    predict = jax.jit(lambda v, x, s: model.apply(v, x, s, method=model.predict))
    opt_state = optimizer.init(variables["params"])
    key = jax.random.key(1)

    start = time.perf_counter()
    compiled_train = train_step.lower(variables, opt_state, batch, key).compile()
    train_compile = time.perf_counter() - start
    start = time.perf_counter()
    compiled_predict = predict.lower(variables, image, sizes).compile()
    predict_compile = time.perf_counter() - start

    out = compiled_predict(variables, image, sizes)
    jax.block_until_ready(out)
    detections = int(np.asarray(out["valid"]).sum())
    infer = timed(lambda: jax.block_until_ready(compiled_predict(variables, image, sizes)), repeats)

    state = [variables, opt_state]

    def one_step():
        state[0], state[1], loss = compiled_train(state[0], state[1], batch, key)
        jax.block_until_ready(loss)

    one_step()
    train = timed(one_step, repeats)
    return {
        "train_compile_s": train_compile,
        "predict_compile_s": predict_compile,
        "train_step_s": train,
        "inference_s": infer,
        "detections": detections,
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
    from maskrcnn_jax.modeling import build_model

    config = config_lib.load(ROOT / config_file).model
    config.detection.score_threshold = 0.0
    model = build_model(config)
    image = np.random.default_rng(0).standard_normal((1, HEIGHT, WIDTH, 3)).astype(np.float32)
    sizes = np.array([[HEIGHT, WIDTH]], np.int32)
    variables = damp_residual_branches(jax.jit(model.init)(jax.random.key(0), image, sizes))
    predict = jax.jit(lambda v, x, s: model.apply(v, x, s, method=model.predict))
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
    # The commit measured: the one checked out when the run starts (others may land while it runs).
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    results = {label: [] for label in BACKBONE_CONFIGS}
    for round_index in range(rounds):
        for label, config_file in BACKBONE_CONFIGS.items():
            out = subprocess.run(
                [sys.executable, __file__, "--side=ours_inference", f"--config_file={config_file}",
                 f"--repeats={repeats}"],
                check=True, capture_output=True, text=True,
            ).stdout
            results[label].append(json.loads(out.split("RESULT ", 1)[1]))
            print(f"round {round_index + 1} {label}", results[label][-1], flush=True)

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from timing import machine_line, write_section

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


def run_torchvision(repeats):
    import numpy as np
    import torch
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    # maskrcnn_resnet50_fpn's own structure, with the FrozenBatchNorm it uses for pretrained weights (its
    # weights=None build switches to BatchNorm2d) and every stage trainable, as on our side.
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=5
    )
    # min/max size equal to the input, so torchvision's transform does not resize it.
    model = MaskRCNN(backbone, num_classes=91, min_size=HEIGHT, max_size=WIDTH, box_score_thresh=0.0)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.uniform(0, 1, (3, HEIGHT, WIDTH)).astype(np.float32))
    boxes, labels, masks = ground_truth(rng)
    target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels), "masks": torch.from_numpy(masks)}

    model.eval()
    with torch.inference_mode():
        detections = len(model([image])[0]["boxes"])
        infer = timed(lambda: model([image]), repeats)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mask_head_rois = []
    model.roi_heads.mask_head.register_forward_hook(lambda module, inputs, output: mask_head_rois.append(len(output)))

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
        "detections": detections,
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "mask_head_rois": mask_head_rois[-1],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=["ours", "torchvision", "ours_inference"])
    parser.add_argument("--backbones", action="store_true",
                        help="time our inference of the Table 2a configs (BACKBONE_CONFIGS) instead")
    parser.add_argument("--config_file", help="--side=ours_inference: the config file of the model to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side per round")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of (ours, torchvision) subprocesses; the sides alternate so that a burst of "
                             "load on a shared machine does not land on one side only")
    args = parser.parse_args()
    if args.side:
        if args.side == "ours_inference":
            result = run_ours_inference(args.config_file, args.repeats)
        else:
            result = run_ours(args.repeats) if args.side == "ours" else run_torchvision(args.repeats)
        print("RESULT " + json.dumps(result))
        return
    if args.backbones:
        backbones(args.repeats, args.rounds)
        return

    rounds = {"ours": [], "torchvision": []}
    for round_index in range(args.rounds):
        for side in ("ours", "torchvision"):
            out = subprocess.run(
                [sys.executable, __file__, f"--side={side}", f"--repeats={args.repeats}"],
                check=True, capture_output=True, text=True,
            ).stdout
            rounds[side].append(json.loads(out.split("RESULT ", 1)[1]))
            print(f"round {round_index + 1} {side}", rounds[side][-1], flush=True)

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from timing import machine_line, write_section

    def pooled(side, key):
        return statistics.median([t for result in rounds[side] for t in result[key]])

    ours, theirs = rounds["ours"][-1], rounds["torchvision"][-1]
    rows = [
        ("train step (s)", pooled("ours", "train_step_s"), pooled("torchvision", "train_step_s")),
        ("inference (s)", pooled("ours", "inference_s"), pooled("torchvision", "inference_s")),
        ("peak RSS of the process (MB)", max(r["peak_rss_mb"] for r in rounds["ours"]),
         max(r["peak_rss_mb"] for r in rounds["torchvision"])),
    ]
    table = ["| measure | ours | torchvision | ours / torchvision |", "| --- | ---: | ---: | ---: |"]
    table += [f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f} |" for name, a, b in rows]

    def per_round(side):
        return ", ".join(f"{statistics.median(r['train_step_s']):.2f}" for r in rounds[side])

    body = "\n".join([
        "## model (`benchmarks/model.py`)",
        "",
        f"Command: `.venv/bin/python benchmarks/model.py --repeats={args.repeats} --rounds={args.rounds}` "
        "(rewrites this section).",
        f"Machine: {machine_line()}.",
        f"R50-FPN Mask R-CNN, random weights, one {HEIGHT}x{WIDTH} image, {NUM_INSTANCES} ground-truth instances,",
        "SGD with momentum. Each side runs in its own process, alternating over the rounds; times are medians over",
        "every timed call of every round. Both sides use torchvision's settings and a score threshold of 0",
        f"(detections: ours {ours['detections']}, torchvision {theirs['detections']}).",
        f"Our compile times: train step {ours['train_compile_s']:.1f} s, inference {ours['predict_compile_s']:.1f} s"
        " (torchvision runs eagerly).",
        f"Train-step medians per round: ours {per_round('ours')} s; torchvision {per_round('torchvision')} s.",
        f"With random weights torchvision's mask head trains on {theirs['mask_head_rois']} RoIs (the positives);"
        " ours on the smallest of 16/32/64/128 that holds them (`roi_heads.mask_roi_buckets`).",
        "",
        *table,
    ])
    write_section("model", body)


if __name__ == "__main__":
    main()
