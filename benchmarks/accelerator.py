"""Mask R-CNN R50-FPN on one accelerator, ours next to torchvision's, on synthetic batches.

    python benchmarks/accelerator.py              # on a GPU machine (at most ~8 min on an H200); prints the section
    python benchmarks/accelerator.py --write      # and replaces its section of benchmarks/RESULTS.md
    python benchmarks/accelerator.py --dry-run    # every row at tiny sizes on the CPU, 1-2 steps (CI runs this)

Ours: configs/coco_r50_fpn_1x.py's model (R50-FPN, FrozenBN, stem and res2 frozen, detectron2's RPN and RoI
settings, 81 classes) on a 1024 x 1024 canvas, random weights, float32 and bfloat16 compute (parameters float32):
  - the train step (train.py's `train_step` under `jit_train_step`'s jit: SGD with momentum, state donated) at a
    batch of 8 and 16: images/s, compile time, peak device memory, and MFU;
  - `MaskRCNN.predict` under jit: latency at batch 1 and 8;
  - the bfloat16 batch-16 step again with RoIAlign's backward as XLA's own transpose of the gathers instead of
    ops/roi_align.py's scatter chain (which runs on every platform): whether the chain is no slower on a GPU.
torchvision: `maskrcnn_resnet50_fpn`'s structure with FrozenBatchNorm and 3 trainable stages (the same recipe),
random weights, min_size = max_size = the canvas (no resize), its own RPN defaults, trained with AMP as its
detection reference scripts do (`torch.autocast` float16 and a GradScaler), cudnn.benchmark on.
Both sides see the same synthetic images and 8 ground-truth instances per image (ellipses inside random boxes; ours
gets them cropped to their boxes at 112 x 112, as the input pipeline sends them).

Nothing here imports TensorFlow, so the accelerator machine needs only jax (CUDA), flax, optax, orbax, torch,
torchvision and numpy: train.py's step needs none (it imports the input pipeline inside train_and_evaluate).

Each row runs in its own subprocess (its own peak memory, no JAX and torch in one process); rows run in order of
priority and a row that would not finish inside --budget-s is reported as not run. Compiles go to a persistent
cache (--cache-dir), so a second run re-measures everything quickly; the compile column marks cache hits.

MFU = (XLA's cost-analysis FLOPs of the compiled step) / (step time) / (the device's dense peak). XLA counts a while
loop's body once (the NMS loops) and a conditional as its costliest branch (the 128-RoI mask-head bucket), so this
is an estimate. Dense
peaks of an H200 SXM, from NVIDIA's H200 page (https://www.nvidia.com/en-us/data-center/h200/, whose tensor-core
figures are "with sparsity", twice the dense rate): BF16 tensor core 1,979 / 2 = 989.5 TFLOPS, TF32 tensor core
989 / 2 = 494.5 TFLOPS (float32 rows: JAX's default precision lets XLA use TF32 for float32 convolutions and
matmuls on Hopper). H200 NVL: 1,671 / 2 and 835 / 2.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
COCO_CONFIG = ROOT / "configs" / "coco_r50_fpn_1x.py"
TINY_CONFIG = ROOT / "configs" / "test.py"
CANVAS = (1024, 1024)
NUM_INSTANCES = 8

# Dense peak TFLOPS by device kind (substring, first match) and compute dtype; see the module docstring.
PEAK_TFLOPS = (
    ("H200 NVL", {"bfloat16": 1671 / 2, "float32": 835 / 2}),
    ("H200", {"bfloat16": 1979 / 2, "float32": 989 / 2}),
)

# Rows in order of priority (the budget cuts from the end): (kind, dtype, batch, variant); dry runs map the batches.
ROWS = (
    ("train", "bfloat16", 16, ""),
    ("torchvision", "amp", 16, ""),
    ("train", "float32", 16, ""),
    ("predict", "float32", 1, ""),
    ("predict", "float32", 8, ""),
    ("train", "bfloat16", 8, ""),
    ("torchvision", "amp", 8, ""),
    ("train", "float32", 8, ""),
    ("train", "bfloat16", 16, "xla_roi_align_backward"),
    ("predict", "bfloat16", 1, ""),
    ("predict", "bfloat16", 8, ""),
)
# Variants of our train step, for the decisions a GPU has to make. xla_roi_align_backward: RoIAlign's backward as
# JAX's own transpose (one scatter-add per bilinear term into its own zeros, summed) instead of ops/roi_align.py's
# chain of scatter-adds into one buffer, which runs on every platform today (issue 19).
VARIANT_NAMES = {"": "ours", "xla_roi_align_backward": "ours, RoIAlign backward by XLA's transpose"}
# A dry run gives every row of a kind the same tiny batch (rows that then repeat run once).
DRY_RUN_BATCH = {"train": 2, "torchvision": 2, "predict": 1}
DRY_RUN_CANVAS = (128, 128)


# -- the rows (each runs in its own subprocess) ---------------------------------------------------------------------


def _config(dry_run, dtype):
    from maskrcnn_jax import config as config_lib

    config = config_lib.load(TINY_CONFIG if dry_run else COCO_CONFIG)
    config.data.canvas_size = DRY_RUN_CANVAS if dry_run else CANVAS
    if dry_run:
        config.model.roi_heads.mask_roi_buckets = 1  # one mask-head branch: a third of the tiny step's compile
    config.model.dtype = dtype
    config.train.warmup_steps = 0
    return config


def _ground_truth(rng, batch, canvas, max_instances, num_classes):
    """Boxes [B, G, 4] (the first NUM_INSTANCES valid), classes in 1..num_classes - 1, validity, and full-image
    ellipse masks per valid instance ([B, n, H, W] uint8)."""
    import numpy as np

    height, width = canvas
    n = min(NUM_INSTANCES, max_instances)
    size = rng.uniform(0.08, 0.4, (batch, n, 2)) * [width, height]
    corner = rng.uniform(0, 1, (batch, n, 2)) * ([width, height] - size)
    boxes = np.zeros((batch, max_instances, 4), np.float32)
    boxes[:, :n] = np.concatenate([corner, corner + size], axis=-1)
    classes = np.zeros((batch, max_instances), np.int32)
    classes[:, :n] = rng.integers(1, num_classes, (batch, n))
    valid = np.zeros((batch, max_instances), bool)
    valid[:, :n] = True
    ys, xs = np.mgrid[:height, :width] + 0.5
    masks = np.zeros((batch, n, height, width), np.uint8)
    for b in range(batch):
        for i, (x1, y1, x2, y2) in enumerate(boxes[b, :n]):
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            masks[b, i] = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
    return boxes, classes, valid, masks


def _our_batch(config, batch_size, seed=0):
    import numpy as np

    from maskrcnn_jax import ops

    d = config.data
    rng = np.random.default_rng(seed)
    boxes, classes, valid, masks = _ground_truth(rng, batch_size, tuple(d.canvas_size), d.max_instances,
                                                 config.model.num_classes)
    n = masks.shape[1]
    gt_masks = np.zeros((batch_size, d.max_instances, d.mask_size, d.mask_size), np.float32)
    for b in range(batch_size):
        gt_masks[b, :n] = np.asarray(ops.crop_masks_to_boxes(masks[b], boxes[b, :n], d.mask_size))
    return {
        "image": rng.integers(0, 256, (batch_size, *d.canvas_size, 3), dtype=np.uint8),  # as the pipeline sends
        "image_size": np.tile(np.asarray(d.canvas_size, np.int32), (batch_size, 1)),
        "gt_boxes": boxes,
        "gt_classes": classes,
        "gt_is_crowd": np.zeros_like(valid),
        "gt_valid": valid,
        "gt_masks": gt_masks.astype(d.mask_dtype),
    }


def _variables(config, model, work_dir):
    """The model's initial variables, initialised once and shared by every row through WORK_DIR (parameters are
    float32 whatever the compute dtype, so one initialisation serves all rows)."""
    import jax
    from flax import serialization

    from maskrcnn_jax.engine import checkpointing

    path = pathlib.Path(work_dir) / f"variables_{'x'.join(map(str, config.data.canvas_size))}.msgpack"
    if path.exists():
        return serialization.msgpack_restore(path.read_bytes())
    variables = jax.device_get(checkpointing.init_variables(model, checkpointing.init_keys(config)[0],
                                                            tuple(config.data.canvas_size)))
    path.write_bytes(serialization.msgpack_serialize(variables))
    return variables


class _CacheHits:
    """Counts the persistent compilation cache's hits (jax.monitoring events) while it is active."""

    def __init__(self):
        import jax

        self.hits = 0
        jax.monitoring.register_event_listener(self._on_event)

    def _on_event(self, event, **kwargs):
        del kwargs
        if event == "/jax/compilation_cache/cache_hits":
            self.hits += 1


def _device_info():
    import jax

    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    return {"platform": device.platform, "device_kind": device.device_kind, "jax": jax.__version__,
            "memory_limit_bytes": stats.get("bytes_limit")}


def _peak_bytes():
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def _xla_memory(compiled):
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
               + analysis.temp_size_in_bytes)


def _xla_flops(compiled):
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _apply_variant(variant):
    if variant == "xla_roi_align_backward":
        import importlib

        import jax

        roi_align = importlib.import_module("maskrcnn_jax.ops.roi_align")
        if not isinstance(roi_align._weighted_gather, jax.custom_vjp):
            raise RuntimeError("ops/roi_align.py's _weighted_gather is no longer a custom VJP: drop this variant")
        roi_align._weighted_gather = roi_align._weighted_gather.fun
    elif variant:
        raise ValueError(f"unknown variant {variant!r}")


def run_train(dtype, batch_size, dry_run, work_dir, variant=""):
    import jax
    import numpy as np

    from maskrcnn_jax.engine import checkpointing, parallel
    from maskrcnn_jax.modeling.mask_rcnn import build_model

    from maskrcnn_jax import train

    _apply_variant(variant)
    config = _config(dry_run, dtype)
    config.train.batch_size = batch_size
    model = build_model(config.model)
    state, tx = checkpointing.create_train_state(config, model, variables=_variables(config, model, work_dir))
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    state = parallel.replicate(state, mesh)
    batch = parallel.global_batch(_our_batch(config, batch_size), mesh, train.model_inputs(config.model))
    step = train.jit_train_step(model, tx, config, mesh)

    cache = _CacheHits()
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    warmup, timed = (1, 1) if dry_run else (3, 10)
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    start = time.perf_counter()
    for _ in range(timed):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    step_s = (time.perf_counter() - start) / timed
    return {"compile_s": compile_s, "compile_cached": cache.hits > 0, "step_s": step_s,
            "images_per_s": batch_size / step_s, "flops": _xla_flops(compiled), "xla_bytes": _xla_memory(compiled),
            "peak_bytes": _peak_bytes(), "finite": bool(np.asarray(metrics["finite"])),
            "loss": float(np.asarray(metrics["loss"])), "steps": warmup + timed}


def run_predict(dtype, batch_size, dry_run, work_dir):
    import jax
    import numpy as np

    from maskrcnn_jax.engine import parallel
    from maskrcnn_jax.modeling.mask_rcnn import build_model

    config = _config(dry_run, dtype)
    model = build_model(config.model)
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    variables = parallel.replicate(_variables(config, model, work_dir), mesh)
    host = _our_batch(config, batch_size)
    host["image"] = (host["image"].astype(np.float32) - 128.0) / 64.0  # serving sends normalised float32 canvases
    inputs = parallel.global_batch(host, mesh, ("image", "image_size"))
    sharded = parallel.batch_sharded(mesh)
    # train.make_predict_fn's jit.
    network = jax.jit(lambda variables, images, sizes: model.apply(variables, images, sizes, method=model.predict),
                      in_shardings=(parallel.replicated(mesh), sharded, sharded), out_shardings=sharded)

    cache = _CacheHits()
    start = time.perf_counter()
    compiled = network.lower(variables, inputs["image"], inputs["image_size"]).compile()
    compile_s = time.perf_counter() - start
    warmup, timed = (1, 2) if dry_run else (3, 20)
    times = []
    for i in range(warmup + timed):
        start = time.perf_counter()
        jax.block_until_ready(compiled(variables, inputs["image"], inputs["image_size"]))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    latency = statistics.median(times)
    return {"compile_s": compile_s, "compile_cached": cache.hits > 0, "latency_s": latency,
            "images_per_s": batch_size / latency, "xla_bytes": _xla_memory(compiled), "peak_bytes": _peak_bytes(),
            "calls": warmup + timed}


def run_torchvision(batch_size, dry_run):
    import numpy as np
    import torch
    import torchvision
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    cuda = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda" if cuda else "cpu")
    canvas = DRY_RUN_CANVAS if dry_run else CANVAS
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    backbone = resnet_fpn_backbone(backbone_name="resnet18" if dry_run else "resnet50", weights=None,
                                   norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    # The dry run's proposal and RoI counts are configs/test.py's.
    tiny = dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=32, rpn_batch_size_per_image=32,
                box_batch_size_per_image=16) if dry_run else {}
    model = MaskRCNN(backbone, num_classes=91, min_size=min(canvas), max_size=max(canvas), **tiny).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    # torchvision's detection references: autocast float16 with a GradScaler. AMP is for CUDA; the dry run's CPU
    # steps run the same code with both off.
    autocast_dtype = torch.float16
    scaler = torch.amp.GradScaler("cuda") if cuda else None

    rng = np.random.default_rng(0)
    boxes, classes, _, masks = _ground_truth(rng, batch_size, canvas, NUM_INSTANCES, 81)
    images = [torch.from_numpy(rng.uniform(0, 1, (3, *canvas)).astype(np.float32)).to(device)
              for _ in range(batch_size)]
    targets = [{"boxes": torch.from_numpy(boxes[b]).to(device),
                "labels": torch.from_numpy(classes[b].astype(np.int64)).to(device),
                "masks": torch.from_numpy(masks[b]).to(device)} for b in range(batch_size)]

    def one_step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=cuda):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    warmup, timed = (1, 1) if dry_run else (3, 10)
    for _ in range(warmup):
        one_step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(timed):
        loss = one_step()
    sync()
    step_s = (time.perf_counter() - start) / timed
    return {"step_s": step_s, "images_per_s": batch_size / step_s,
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None, "loss": float(loss.detach()),
            "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "autocast": str(autocast_dtype).replace("torch.", "") if cuda else "off on the CPU",
            "steps": warmup + timed}


def run_row(row, dry_run, work_dir, cache_dir):
    kind, dtype, batch_size, variant = row
    if kind == "torchvision":
        result = run_torchvision(batch_size, dry_run)
    else:
        import jax

        if cache_dir:
            jax.config.update("jax_compilation_cache_dir", cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        if kind == "train":
            result = run_train(dtype, batch_size, dry_run, work_dir, variant)
        else:
            result = run_predict(dtype, batch_size, dry_run, work_dir)
        result.update(_device_info())
    result["tensorflow_imported"] = any(name == "tensorflow" or name.startswith("tensorflow.")
                                        for name in sys.modules)
    return result


# -- the parent: budget, subprocesses, the markdown section -------------------------------------------------------


def _planned_rows(dry_run):
    """ROWS; a dry run maps their batches (DRY_RUN_BATCH), runs each distinct row once, and then the first train row
    again, which must load its compiled step from the persistent cache."""
    if not dry_run:
        return list(ROWS)
    distinct = list(dict.fromkeys((kind, dtype, DRY_RUN_BATCH[kind], variant) for kind, dtype, _, variant in ROWS))
    return distinct + [next(row for row in distinct if row[0] == "train")]


def _run_subprocess(row, args, work_dir, timeout):
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--row", json.dumps(row),
               "--work-dir", work_dir]
    if args.cache_dir:
        command += ["--cache-dir", args.cache_dir]
    if args.dry_run:
        command.append("--dry-run")
    env = dict(os.environ)
    if args.dry_run:
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        # One JAX process at a time holds the device; let it use most of it (JAX's default is 75 %).
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    start = time.perf_counter()
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"not finished within the time budget ({timeout:.0f} s)"}, time.perf_counter() - start
    wall = time.perf_counter() - start
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), wall
    tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"exit {out.returncode}: {tail[0][:200]}"}, wall


def _git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, check=True).stdout.strip()
        return commit + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _peak_tflops(device_kind, dtype):
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in (device_kind or "").lower():
            return peaks.get(dtype)
    return None


def _gib(value):
    return f"{value / 2**30:.1f}" if value else "n/a"


def _seconds(result, key):
    compiled = result.get(key)
    if compiled is None:
        return "n/a"
    return f"{compiled:.1f}" + (" (cached)" if result.get("compile_cached") else "")


def section(results, args, elapsed):
    """The markdown section: one line per row of ROWS, measured or not."""
    jax_info = next((r for _, r in results if "device_kind" in r), {})
    torch_info = next((r for (kind, *_), r in results if kind == "torchvision" and "torch" in r), {})
    canvas = DRY_RUN_CANVAS if args.dry_run else CANVAS
    model = "configs/test.py's tiny model" if args.dry_run else "configs/coco_r50_fpn_1x.py's R50-FPN"
    lines = [
        "## accelerator (`benchmarks/accelerator.py`)",
        "",
        f"Command: `python benchmarks/accelerator.py{' --dry-run' if args.dry_run else ' --write'}` "
        f"(commit {_git_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s).",
        f"Device: {jax_info.get('device_kind', 'n/a')} ({jax_info.get('platform', 'n/a')}, "
        f"{_gib(jax_info.get('memory_limit_bytes'))} GiB for JAX), jax {jax_info.get('jax', 'n/a')}, "
        f"torch {torch_info.get('torch', 'n/a')} on {torch_info.get('device', 'n/a')}, "
        f"torchvision {torch_info.get('torchvision', 'n/a')}, python {platform.python_version()}.",
        f"{model} on a {canvas[0]}x{canvas[1]} canvas, random weights, synthetic batches with {NUM_INSTANCES} "
        "instances per image; no TensorFlow imported: "
        + ("yes (!)" if any(r.get("tensorflow_imported") for _, r in results) else "no") + ".",
        "Train rows: images/s over the timed steps after warm-up; peak memory is the device allocator's peak "
        "(JAX: memory_stats, torch: max_memory_allocated), XLA memory the compiled step's arguments + outputs - "
        "aliased + temporaries; MFU = XLA cost-analysis FLOPs / step time / dense peak (module docstring).",
        "",
        "| train step | dtype | batch | images/s | step (ms) | compile (s) | peak memory (GiB) | XLA memory (GiB) "
        "| TFLOP / step | MFU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (kind, dtype, batch, variant), result in results:
        if kind not in ("train", "torchvision"):
            continue
        name = VARIANT_NAMES[variant] if kind == "train" else "torchvision"
        dtype_label = dtype if kind == "train" else f"AMP ({result.get('autocast', 'float16')})"
        if "error" in result:
            lines.append(f"| {name} | {dtype_label} | {batch} | {result['error']} | | | | | | |")
            continue
        flops = result.get("flops")
        peak = _peak_tflops(result.get("device_kind"), dtype)
        mfu = f"{100 * flops / result['step_s'] / (peak * 1e12):.1f} %" if flops and peak else "n/a"
        lines.append(
            f"| {name} | {dtype_label} | {batch} | {result['images_per_s']:.2f} | {1e3 * result['step_s']:.0f} | "
            f"{_seconds(result, 'compile_s') if kind == 'train' else 'eager'} | {_gib(result.get('peak_bytes'))} | "
            f"{_gib(result.get('xla_bytes'))} | {f'{flops / 1e12:.2f}' if flops else 'n/a'} | {mfu} |")
    lines += [
        "",
        "| inference (ours) | dtype | batch | latency (ms) | images/s | compile (s) | peak memory (GiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (kind, dtype, batch, _), result in results:
        if kind != "predict":
            continue
        if "error" in result:
            lines.append(f"| predict | {dtype} | {batch} | {result['error']} | | | |")
            continue
        lines.append(f"| predict | {dtype} | {batch} | {1e3 * result['latency_s']:.1f} | {result['images_per_s']:.1f} "
                     f"| {_seconds(result, 'compile_s')} | {_gib(result.get('peak_bytes'))} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every row at tiny sizes on the CPU, 1-2 steps")
    parser.add_argument("--write", action="store_true", help="replace the section in benchmarks/RESULTS.md")
    parser.add_argument("--budget-s", type=float,
                        help="wall-clock budget for all rows (default 450 s, a dry run 1800 s); rows that would "
                             "overrun it are cut and reported as not run")
    parser.add_argument("--cache-dir", default=str(pathlib.Path.home() / ".cache" / "maskrcnn_jax_accelerator"),
                        help="persistent JAX compilation cache ('' for none)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        result = run_row(tuple(json.loads(args.row)), args.dry_run, args.work_dir, args.cache_dir)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.write and args.dry_run:
        parser.error("--write records real measurements; a dry run only checks that every row runs")
    if args.budget_s is None:
        args.budget_s = 1800.0 if args.dry_run else 450.0

    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as work_dir:
        for row in _planned_rows(args.dry_run):
            left = args.budget_s - (time.perf_counter() - start)
            if left < 20:
                results.append((row, {"error": "not run: time budget spent"}))
                continue
            result, wall = _run_subprocess(row, args, work_dir, left)
            results.append((row, result))
            print(f"{row}: {wall:.0f} s {json.dumps(result)}", file=sys.stderr, flush=True)
    body = section(results, args, time.perf_counter() - start)
    print(body)
    if args.write:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        from timing import write_section

        write_section("accelerator", body)


if __name__ == "__main__":
    main()
