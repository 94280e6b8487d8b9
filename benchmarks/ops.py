"""Times each op against torchvision on this machine, same inputs, side by side in one run.

    .venv/bin/python benchmarks/ops.py            # prints the table and rewrites its section of RESULTS.md
    .venv/bin/python benchmarks/ops.py --only roi # RoI pooling rows only, printed; RESULTS.md is left alone

Ours: jit-compiled, steady state (compile excluded, reported separately). torchvision: eager, its CPU kernels.
Both use the machine's default thread counts. Ratio = ours / torchvision (lower is better; < 1 is faster).
"fwd+bwd" rows time the feature gradient for a random cotangent (torchvision: autograd on the same).
"""

import argparse
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import MultiScaleRoIAlign

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from timing import head_commit, machine_line, median_seconds, time_jax, write_section  # noqa: E402

from maskrcnn_jax import ops  # noqa: E402
from maskrcnn_jax.ops.anchors import _anchors_for_shape, feature_map_size  # noqa: E402

IMAGE = (800, 1344)
STRIDES = (4, 8, 16, 32)


def random_boxes(rng, n, height, width, min_size=8.0, max_size=512.0):
    """Proposal-like boxes: log-uniform sizes, centres inside the image."""
    size = np.exp(rng.uniform(np.log(min_size), np.log(max_size), (n, 2)))
    centre = rng.uniform(0, 1, (n, 2)) * [width, height]
    return np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)


def clustered_boxes(rng, n, clusters, height, width):
    """Heavily overlapping boxes: jittered copies of a few cluster boxes."""
    centres = random_boxes(rng, clusters, height, width, 32, 256)
    base = centres[rng.integers(0, clusters, n)]
    return (base + rng.normal(0, 4.0, (n, 4))).astype(np.float32)


def torch_time(fn, repeats=7):
    with torch.inference_mode():
        return median_seconds(fn, repeats=repeats)


def time_jax_forward_backward(pool, features, boxes, cotangent):
    """(compile s, median s) of pool's forward and its VJP w.r.t. the features, jit-compiled."""

    def forward_backward(f, b, c):
        _, vjp = jax.vjp(lambda x: pool(x, b), f)
        return vjp(c)[0]

    return time_jax(forward_backward, features, boxes, cotangent)


def torch_forward_backward_time(forward, leaves, cotangent, repeats=7):
    """Median seconds of forward() and its backward into the `leaves` (tensors that require grad)."""

    def step():
        for leaf in leaves:
            leaf.grad = None
        forward().backward(cotangent)

    return median_seconds(step, repeats=repeats)


def table2c_variants(multilevel, output, aligned):
    """The Mask R-CNN paper's Table 2c poolings beside RoIAlign avg: name -> pool(features, boxes). torchvision has
    no max mode and no RoIWarp, so its RoIAlign (avg, same samples per bin) is their peer in the table."""
    if multilevel:
        return {
            "multilevel_roi_align max": lambda f, b: ops.multilevel_roi_align(f, b, output, STRIDES, 2, aligned, "max"),
            "multilevel_roi_warp avg": lambda f, b: ops.multilevel_roi_warp(f, b, output, STRIDES, 2, "avg"),
            "multilevel_roi_warp max": lambda f, b: ops.multilevel_roi_warp(f, b, output, STRIDES, 2, "max"),
        }
    return {
        "roi_align max": lambda f, b: ops.roi_align(f, b, output, 1 / 8, 2, aligned, "max"),
        "roi_warp avg": lambda f, b: ops.roi_warp(f, b, output, 1 / 8, 2, "avg"),
        "roi_warp max": lambda f, b: ops.roi_warp(f, b, output, 1 / 8, 2, "max"),
    }


def group_norm_rows(record):
    """GroupNorm (32 groups) forward and backward into the input, weight and bias: ours (layers/norm.py, its
    backward written out) and autodiff of the textbook normalisation, each beside torch's group_norm with autograd.
    Its own random stream, so that the rows before it keep their inputs."""
    from maskrcnn_jax.layers.norm import group_norm

    rng = np.random.default_rng(2)

    def textbook(x, weight, bias, groups, eps, dtype):
        grouped = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = grouped.mean(axes, keepdims=True)
        var = jnp.square(grouped - mean).mean(axes, keepdims=True)
        return (((grouped - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * weight + bias).astype(dtype)

    for label, shape in (("the demo's layer1: 4 x 48x48, C=64", (4, 48, 48, 64)),
                         ("an FPN P2 of 800x1344: 200x336, C=256", (1, 200, 336, 256))):
        x = rng.standard_normal(shape).astype(np.float32) * 2 + 1
        weight, bias = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
        cotangent = rng.standard_normal(shape).astype(np.float32)
        leaves = [torch.from_numpy(a.copy()).requires_grad_() for a in (x.transpose(0, 3, 1, 2), weight, bias)]
        theirs = torch_forward_backward_time(
            lambda: torch.nn.functional.group_norm(leaves[0], 32, leaves[1], leaves[2], 1e-5), leaves,
            torch.from_numpy(cotangent.transpose(0, 3, 1, 2).copy()))
        for name, norm in (("group_norm fwd+bwd", group_norm), ("group_norm by autodiff fwd+bwd", textbook)):
            def forward_backward(x, weight, bias, cotangent, norm=norm):
                _, vjp = jax.vjp(lambda *a: norm(*a, 32, 1e-5, jnp.float32), x, weight, bias)
                return vjp(cotangent)

            compile_s, ours = time_jax(forward_backward, x, weight, bias, cotangent)
            record(name, label, ours, theirs, compile_s)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Times each op against torchvision.")
    parser.add_argument("--only", choices=["roi", "norm"],
                        help="time only these rows and print them; RESULTS.md is left alone")
    args = parser.parse_args(argv)
    commit = head_commit()
    rng = np.random.default_rng(0)
    # Cotangents come from their own stream so that the rows after them keep their inputs.
    cotangent_rng = np.random.default_rng(1)
    rows = []

    def record(name, size, ours, theirs, compile_s):
        rows.append((name, size, ours * 1e3, theirs * 1e3, ours / theirs, compile_s))
        print(f"{name:40s} {size:44s} ours {ours * 1e3:9.2f} ms  torchvision {theirs * 1e3:9.2f} ms  "
              f"ratio {ours / theirs:5.2f}  compile {compile_s:5.1f} s", flush=True)

    if args.only == "norm":
        group_norm_rows(record)
        return

    # -- RoIAlign: 1,000 boxes on the P2-P5 levels of an 800x1344 input, C=256 -------------------------------
    levels_np = [rng.standard_normal((1, 256, *feature_map_size(IMAGE, s))).astype(np.float32) for s in STRIDES]
    boxes_np = random_boxes(rng, 1000, *IMAGE)
    levels_nhwc = [jnp.asarray(x.transpose(0, 2, 3, 1)) for x in levels_np]
    levels_torch = {str(i): torch.from_numpy(x) for i, x in enumerate(levels_np)}
    pyramid_size = "1000 boxes, P2-P5 of 800x1344, C=256"
    for output in (7, 14):
        pooler = MultiScaleRoIAlign(list(levels_torch), output, sampling_ratio=2)
        align_avg = lambda f, b: ops.multilevel_roi_align(f, b, output, STRIDES, 2, False)  # noqa: E731
        compile_s, ours = time_jax(align_avg, levels_nhwc, boxes_np[None])
        theirs = torch_time(lambda: pooler(levels_torch, [torch.from_numpy(boxes_np)], [IMAGE]))
        record(f"multilevel_roi_align {output}x{output}", pyramid_size, ours, theirs, compile_s)
        variants = table2c_variants(True, output, False)
        for name, pool in variants.items():
            compile_s, ours = time_jax(pool, levels_nhwc, boxes_np[None])
            record(f"{name} {output}x{output}", pyramid_size, ours, theirs, compile_s)

        cotangent = cotangent_rng.standard_normal((1, 1000, output, output, 256)).astype(np.float32)
        leaves = {k: v.clone().requires_grad_() for k, v in levels_torch.items()}
        theirs = torch_forward_backward_time(
            lambda: pooler(leaves, [torch.from_numpy(boxes_np)], [IMAGE]),
            list(leaves.values()),
            torch.from_numpy(cotangent[0].transpose(0, 3, 1, 2).copy()),
        )
        for name, pool in {"multilevel_roi_align": align_avg, **variants}.items():
            compile_s, ours = time_jax_forward_backward(pool, levels_nhwc, boxes_np[None], cotangent)
            record(f"{name} {output}x{output} fwd+bwd", pyramid_size, ours, theirs, compile_s)

    p3_np = levels_np[1]
    p3 = levels_nhwc[1]
    p3_size = "1000 boxes, 100x168x256 (P3)"
    align_avg = lambda f, b: ops.roi_align(f, b, 7, 1 / 8, 2, True)  # noqa: E731
    compile_s, ours = time_jax(align_avg, p3, boxes_np[None])
    rois = torch.from_numpy(np.concatenate([np.zeros((1000, 1), np.float32), boxes_np], 1))
    theirs = torch_time(lambda: torchvision.ops.roi_align(torch.from_numpy(p3_np), rois, 7, 1 / 8, 2, True))
    record("roi_align 7x7", p3_size, ours, theirs, compile_s)
    variants = table2c_variants(False, 7, True)
    for name, pool in variants.items():
        compile_s, ours = time_jax(pool, p3, boxes_np[None])
        record(f"{name} 7x7", p3_size, ours, theirs, compile_s)

    cotangent = cotangent_rng.standard_normal((1, 1000, 7, 7, 256)).astype(np.float32)
    p3_leaf = torch.from_numpy(p3_np).requires_grad_()
    theirs = torch_forward_backward_time(
        lambda: torchvision.ops.roi_align(p3_leaf, rois, 7, 1 / 8, 2, True),
        [p3_leaf],
        torch.from_numpy(cotangent[0].transpose(0, 3, 1, 2).copy()),
    )
    for name, pool in {"roi_align": align_avg, **variants}.items():
        compile_s, ours = time_jax_forward_backward(pool, p3, boxes_np[None], cotangent)
        record(f"{name} 7x7 fwd+bwd", p3_size, ours, theirs, compile_s)

    compile_s, ours = time_jax(lambda f, b: ops.roi_pool(f, b, 7, 1 / 8), p3, boxes_np[None])
    theirs = torch_time(lambda: torchvision.ops.roi_pool(torch.from_numpy(p3_np), rois, 7, 1 / 8))
    record("roi_pool 7x7", "1000 boxes, 100x168x256 (P3)", ours, theirs, compile_s)
    if args.only == "roi":
        return

    # -- NMS: 10,000 boxes ----------------------------------------------------------------------------------
    scores_np = rng.uniform(0, 1, 10000).astype(np.float32)
    for label, boxes, threshold, max_output in (
        ("heavy overlap", clustered_boxes(rng, 10000, 50, *IMAGE), 0.5, 1000),
        ("RPN-like", random_boxes(rng, 10000, *IMAGE, 16, 256), 0.7, 1000),
        ("RPN-like", random_boxes(rng, 10000, *IMAGE, 16, 256), 0.7, 2000),
    ):
        compile_s, ours = time_jax(lambda b, s: ops.nms(b, s, threshold, max_output), boxes, scores_np)
        theirs = torch_time(lambda: torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores_np), threshold))
        record("nms", f"10,000 boxes, {label}, IoU {threshold}, keep <= {max_output}", ours, theirs, compile_s)

    boxes = random_boxes(rng, 10000, *IMAGE, 16, 256)
    classes_np = rng.integers(0, 80, 10000).astype(np.int32)
    compile_s, ours = time_jax(lambda b, s, c: ops.batched_nms(b, s, c, 0.5, 100), boxes, scores_np, classes_np)
    theirs = torch_time(lambda: torchvision.ops.batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores_np), torch.from_numpy(classes_np).long(), 0.5))
    record("batched_nms", "10,000 boxes, 80 classes, IoU 0.5, keep <= 100", ours, theirs, compile_s)

    # -- Anchors, box coding, matching and sampling on the ~240k anchors of 800x1344 -------------------------
    generator = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    fmaps = [torch.zeros(1, 1, *feature_map_size(IMAGE, s)) for s in (4, 8, 16, 32, 64)]
    image_list = ImageList(torch.zeros(1, 3, *IMAGE), [IMAGE])
    def build_anchors():  # the work of one build: ours caches per shape, so clear the cache first
        _anchors_for_shape.cache_clear()
        jax.block_until_ready(ops.generate_anchors(IMAGE))

    ours = median_seconds(build_anchors)
    theirs = torch_time(lambda: generator(image_list, fmaps))
    record("generate_anchors", "P2-P6 of 800x1344, uncached (ours caches per shape)", ours, theirs, 0.0)

    anchors = np.concatenate([np.asarray(a) for a in ops.generate_anchors(IMAGE)])
    gt = random_boxes(rng, 100, *IMAGE, 16, 512)
    gt_valid = np.ones(100, bool)
    gt_crowd = np.zeros(100, bool)
    compile_s, ours = time_jax(
        lambda g, v, c, a: ops.match_boxes(g, v, c, a, 0.3, 0.7, True), gt, gt_valid, gt_crowd, anchors
    )
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)
    gt_t, anchors_t = torch.from_numpy(gt), torch.from_numpy(anchors)
    theirs = torch_time(lambda: matcher(torchvision.ops.box_iou(gt_t, anchors_t)))
    record("match_boxes (IoU + Matcher)", f"100 gt x {len(anchors):,} anchors", ours, theirs, compile_s)

    labels_np = rng.choice([-1, 0, 1], len(anchors), p=[0.2, 0.79, 0.01]).astype(np.int32)
    key = jax.random.key(0)
    compile_s, ours = time_jax(lambda k, l: ops.sample_balanced(k, l, 256, 0.5), key, labels_np)
    sampler = BalancedPositiveNegativeSampler(256, 0.5)
    labels_t = torch.from_numpy(labels_np)
    theirs = torch_time(lambda: sampler([labels_t]))
    record("sample_balanced", f"256 of {len(anchors):,} labels", ours, theirs, compile_s)

    deltas = rng.normal(0, 1, anchors.shape).astype(np.float32)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0), math.log(1000 / 16))
    compile_s, ours = time_jax(ops.decode_boxes, deltas, anchors)
    deltas_t = torch.from_numpy(deltas)
    theirs = torch_time(lambda: coder.decode_single(deltas_t, anchors_t))
    record("decode_boxes", f"{len(anchors):,} anchors", ours, theirs, compile_s)
    targets = anchors + rng.normal(0, 4, anchors.shape).astype(np.float32)
    compile_s, ours = time_jax(ops.encode_boxes, targets, anchors)
    targets_t = torch.from_numpy(targets)
    theirs = torch_time(lambda: coder.encode_single(targets_t, anchors_t))
    record("encode_boxes", f"{len(anchors):,} anchors", ours, theirs, compile_s)

    a, b = random_boxes(rng, 1000, *IMAGE), random_boxes(rng, 1000, *IMAGE)
    compile_s, ours = time_jax(ops.box_iou, a, b)
    a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)
    theirs = torch_time(lambda: torchvision.ops.box_iou(a_t, b_t))
    record("box_iou", "1,000 x 1,000", ours, theirs, compile_s)

    # -- Mask pasting: 100 detections into an 800x1344 image -------------------------------------------------
    masks = rng.uniform(0, 1, (100, 28, 28)).astype(np.float32)
    det_boxes = random_boxes(rng, 100, *IMAGE, 16, 512)
    compile_s, ours = time_jax(lambda m, b: ops.paste_masks(m, b, IMAGE), masks, det_boxes)
    masks_t, det_t = torch.from_numpy(masks)[:, None], torch.from_numpy(det_boxes)
    theirs = torch_time(lambda: paste_masks_in_image(masks_t, det_t, IMAGE) > 0.5)
    record("paste_masks", "100 masks 28x28 into 800x1344", ours, theirs, compile_s)

    # -- GroupNorm ------------------------------------------------------------------------------------------
    group_norm_rows(record)

    table = [
        "| op | size | ours (ms) | torchvision (ms) | ours / torchvision | our compile (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    table += [f"| `{n}` | {s} | {o:.2f} | {t:.2f} | {r:.2f} | {c:.1f} |" for n, s, o, t, r, c in rows]
    body = "\n".join([
        "## ops (`benchmarks/ops.py`)",
        "",
        f"Command: `.venv/bin/python benchmarks/ops.py` (rewrites this section), at commit {commit}.",
        f"Machine: {machine_line()}.",
        "Ours is jit-compiled and timed in steady state (median of 7, compile excluded); torchvision runs its CPU",
        "kernels eagerly on the same arrays. A ratio below 1 means ours is faster.",
        "torchvision has neither a max reduction nor RoIWarp, so the `max` and `roi_warp` rows sit beside its RoIAlign",
        "(avg, the same samples per bin). The GroupNorm rows sit beside torch's `group_norm` with autograd; the",
        "autodiff row is the textbook normalisation differentiated by JAX, which layers/norm.py replaced.",
        "",
        *table,
    ])
    write_section("ops", body)
    worst = max(rows, key=lambda r: r[4])
    print(f"slowest relative to torchvision: {worst[0]} at {worst[4]:.2f}x")


if __name__ == "__main__":
    main()
