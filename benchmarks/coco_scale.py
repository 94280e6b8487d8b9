"""COCO-scale costs, measured on COCO-like data that this script writes (no images needed).

--part=eval: the host side of evaluation on COCO-like validation annotations (640x480 images, ~7.3 instances per
image with some images of 50-90, polygons of 20-60 vertices, ~1 % crowd RLEs, 80 categories) and 100 detections
per image with 28x28 mask probabilities. Each stage is timed in this one run, the previous way beside the current:

  map + paste   canvas outputs -> original boxes and masks (serving.host.image_results): full-image masks before,
                mask crops now
  RLE           pycocotools' encode of the full masks (a Fortran-order copy first) before, the runs read off the
                crops now (evaluation.coco.encode_mask_crops)
  COCOeval      plain pycocotools (loadRes of a deepcopy, bbox + segm, evaluate + accumulate) beside
                evaluation.coco.coco_metrics (shallow copies; segm scored on mask areas)

and extrapolates each to COCO val's 5,000 images. Beside them it times the evaluator's pooled host side: map, paste
and RLE of batches of 8 images over --host_workers worker processes (evaluation.host_pool; default as
eval.host_workers: min(cores, 8); their start included), the result dicts rebuilt from the compact arrays they
return (evaluation.result_arrays), and the same COCOeval; and reports the whole against plain pycocotools COCOeval
alone. In an evaluation the pool works while the devices predict the next batch; here nothing is predicted.

    .venv/bin/python benchmarks/coco_scale.py --part=eval [--images=500] [--host_workers=N] [--write]
"""

import argparse
import contextlib
import copy
import io
import time

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_jax import config as config_lib
from maskrcnn_jax.data.coco_format import CategoryMap
from maskrcnn_jax.evaluation import coco, host_pool, result_arrays
from maskrcnn_jax.serving import host
from maskrcnn_jax.serving.predictor import spec_from_config

HEIGHT, WIDTH = 480, 640
CANVAS_SCALE = 800 / 480  # the shorter side resized to 800, as COCO's test resize does
NUM_CATEGORIES = 80
DETECTIONS_PER_IMAGE = 100
COCO_VAL_IMAGES = 5000
EVAL_BATCH = 8  # images per submission to the host pool, as eval.batch_size's default


def _polygon(rng, cx, cy, rx, ry):
    vertices = int(rng.integers(20, 61))
    angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    radii = rng.uniform(0.7, 1.0, vertices)
    xs = np.clip(cx + rx * radii * np.cos(angles), 0, WIDTH)
    ys = np.clip(cy + ry * radii * np.sin(angles), 0, HEIGHT)
    return np.stack([xs, ys], 1).reshape(-1).tolist()


def coco_like_ground_truth(rng, num_images):
    """A COCO object with COCO val's statistics (see the module doc)."""
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": HEIGHT, "width": WIDTH})
        count = int(rng.integers(50, 91)) if rng.uniform() < 0.01 else int(rng.poisson(6.6))
        for _ in range(count):
            side = float(np.exp(rng.uniform(np.log(6), np.log(420))))
            aspect = float(np.exp(rng.uniform(-0.7, 0.7)))
            rx, ry = side * aspect / 2, side / aspect / 2
            cx, cy = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
            crowd = rng.uniform() < 0.01
            if crowd:
                yy, xx = np.mgrid[:HEIGHT, :WIDTH] + 0.5
                mask = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.uint8)
                if not mask.any():
                    continue
                segmentation = mask_utils.encode(np.asfortranarray(mask))
                segmentation["counts"] = segmentation["counts"].decode("ascii")
            else:
                segmentation = [_polygon(rng, cx, cy, rx, ry)]
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, HEIGHT, WIDTH)) if not crowd else segmentation
            area = float(mask_utils.area(rle))
            if area < 1:
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.integers(1, NUM_CATEGORIES + 1)),
                                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": area,
                                "iscrowd": int(crowd), "segmentation": segmentation})
    dataset = {"images": images, "annotations": annotations,
               "categories": [{"id": c, "name": f"class_{c}"} for c in range(1, NUM_CATEGORIES + 1)]}
    gt = COCO()
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def model_outputs(rng, gt, image_id):
    """100 detections on the canvas as MaskRCNN.predict gives them: jittered copies of the ground truth, then
    random boxes; ellipse-shaped 28x28 probabilities."""
    boxes = []
    for annotation in gt.imgToAnns[image_id]:
        x, y, w, h = annotation["bbox"]
        for _ in range(int(rng.integers(1, 4))):
            dx, dy = rng.normal(0, 0.1 * w), rng.normal(0, 0.1 * h)
            boxes.append([x + dx, y + dy, x + dx + w * rng.uniform(0.8, 1.2), y + dy + h * rng.uniform(0.8, 1.2)])
    while len(boxes) < DETECTIONS_PER_IMAGE:
        x, y = rng.uniform(0, WIDTH - 8), rng.uniform(0, HEIGHT - 8)
        side = float(np.exp(rng.uniform(np.log(8), np.log(400))))
        boxes.append([x, y, x + side * rng.uniform(0.5, 1.5), y + side * rng.uniform(0.5, 1.5)])
    boxes = np.clip(np.asarray(boxes[:DETECTIONS_PER_IMAGE], np.float32), 0, [WIDTH, HEIGHT, WIDTH, HEIGHT])
    grid = (np.arange(28, dtype=np.float32) + 0.5) / 14 - 1
    radius = np.sqrt(grid[:, None] ** 2 + grid[None, :] ** 2)
    logits = 6 * (0.8 - radius)[None] + rng.normal(0, 1.5, (DETECTIONS_PER_IMAGE, 28, 28))
    return {"boxes": boxes * np.float32(CANVAS_SCALE),
            "scores": np.sort(rng.uniform(size=DETECTIONS_PER_IMAGE).astype(np.float32))[::-1],
            "classes": rng.integers(1, NUM_CATEGORIES + 1, DETECTIONS_PER_IMAGE).astype(np.int32),
            "masks": (1 / (1 + np.exp(-logits))).astype(np.float32),
            "valid": np.ones(DETECTIONS_PER_IMAGE, bool)}


def previous_results(outputs, image_id, prepared, spec):
    """The previous commit's host side: full-image masks, then pycocotools' encode of them."""
    detections = host.image_results(outputs, prepared, spec, score_threshold=-np.inf)
    masks = detections["masks"]
    start = time.perf_counter()
    rles = coco.encode_masks(masks)
    rle_seconds = time.perf_counter() - start
    results = [coco.coco_result(image_id, c, b, s, r) for b, s, c, r in
               zip(detections["boxes"], detections["scores"], detections["labels"], rles)]
    return results, rle_seconds


def current_results(outputs, image_id, prepared, spec):
    detections = host.image_results(outputs, prepared, spec, score_threshold=-np.inf, mask_crops=True)
    start = time.perf_counter()
    rles = coco.encode_mask_crops(detections["mask_crops"], HEIGHT, WIDTH)
    rle_seconds = time.perf_counter() - start
    results = [coco.coco_result(image_id, c, b, s, r) for b, s, c, r in
               zip(detections["boxes"], detections["scores"], detections["labels"], rles)]
    return results, rle_seconds


def plain_cocoeval(gt, results):
    with contextlib.redirect_stdout(io.StringIO()):
        for iou_type in ("bbox", "segm"):
            evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()


def pooled_results(outputs, image_ids, prepared, spec, workers):
    """The evaluator's host side: batches handed to the host pool, then result dicts of its compact arrays."""
    batches = [(image_ids[i:i + EVAL_BATCH], {k: np.stack([o[k] for o in outputs[i:i + EVAL_BATCH]])
                                              for k in outputs[0]}) for i in range(0, len(outputs), EVAL_BATCH)]
    start = time.perf_counter()
    with host_pool.HostPool(workers, spec) as pool:
        for ids, batch in batches:
            pool.submit(batch, ids, [prepared.image_size] * len(ids), [prepared.original_size] * len(ids))
        arrays = pool.results(with_masks=True, num_keypoints=None)
    pooled = time.perf_counter() - start
    start = time.perf_counter()
    results = result_arrays.to_results(arrays)
    return results, {"map + paste + RLE": pooled, "result dicts": time.perf_counter() - start}


def measure_eval(num_images, seed, host_workers=None):
    rng = np.random.default_rng(seed)
    gt = coco_like_ground_truth(rng, num_images)
    categories = CategoryMap(tuple(range(1, NUM_CATEGORIES + 1)),
                             tuple(f"class_{c}" for c in range(1, NUM_CATEGORIES + 1)))
    spec = spec_from_config(config_lib.base_config(), categories, 1)
    prepared = host.PreparedImage(None, (800, round(WIDTH * CANVAS_SCALE)), (HEIGHT, WIDTH))
    outputs = [model_outputs(rng, gt, image_id) for image_id in gt.getImgIds()]
    seconds = {}
    for name, host_side in (("previous", previous_results), ("current", current_results)):
        results, rle_seconds = [], 0.0
        start = time.perf_counter()
        for image_id, output in zip(gt.getImgIds(), outputs):
            image_results, rle = host_side(output, image_id, prepared, spec)
            results.extend(image_results)
            rle_seconds += rle
        total = time.perf_counter() - start
        seconds[name] = {"map + paste": total - rle_seconds, "RLE": rle_seconds}
        if name == "previous":
            previous = results
        else:
            assert [r["segmentation"] for r in results] == [r["segmentation"] for r in previous], "RLEs differ"
    start = time.perf_counter()
    plain_cocoeval(gt, results)
    seconds["previous"]["COCOeval"] = time.perf_counter() - start
    start = time.perf_counter()
    metrics, _ = coco.coco_metrics(gt, results, iou_types=("bbox", "segm"))
    seconds["current"]["COCOeval"] = time.perf_counter() - start
    workers = host_pool.resolve_workers(host_workers)
    pooled, seconds["pooled"] = pooled_results(outputs, gt.getImgIds(), prepared, spec, workers)
    assert pooled == results, "the pool's results differ from the in-process ones"
    seconds["pooled"]["COCOeval"] = seconds["current"]["COCOeval"]
    return gt, seconds, metrics, workers


def report_eval(args, gt, seconds, metrics, workers, commit, machine):
    per_image = len(gt.dataset["annotations"]) / len(gt.dataset["images"])
    workers_flag = "" if args.host_workers is None else f" --host_workers={args.host_workers}"
    lines = [
        "## COCO-scale evaluation, host side (`benchmarks/coco_scale.py --part=eval`)",
        "",
        f"Command: `.venv/bin/python benchmarks/coco_scale.py --part=eval --images={args.images}{workers_flag} "
        f"--write` (rewrites this section), at commit {commit}.",
        f"Machine: {machine}.",
        f"{args.images} COCO-like 640x480 validation images ({per_image:.2f} instances per image), "
        f"{DETECTIONS_PER_IMAGE} detections each; one process, one run, each stage timed once. \"Previous\" is "
        "full-image masks, pycocotools' encode and a plain pycocotools COCOeval (bbox + segm, loadRes of a "
        "deepcopy); \"current\" is the package's evaluation path. Both give the same RLEs.",
        "",
        "| stage | previous (s) | current (s) | current / previous | current, 5,000 images (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    scale = COCO_VAL_IMAGES / args.images
    for stage in ("map + paste", "RLE", "COCOeval"):
        before, after = seconds["previous"][stage], seconds["current"][stage]
        lines.append(f"| {stage} | {before:.2f} | {after:.2f} | {after / before:.2f} | {after * scale:.0f} |")
    before, after = sum(seconds["previous"].values()), sum(seconds["current"].values())
    lines.append(f"| all | {before:.2f} | {after:.2f} | {after / before:.2f} | {after * scale:.0f} |")
    plain = seconds["previous"]["COCOeval"]
    lines += ["", f"The whole current host side is {after / plain:.2f}x plain pycocotools COCOeval alone on the "
              f"same results. segm AP {metrics['segm_AP']:.3f}, bbox AP {metrics['bbox_AP']:.3f} (random "
              "detections; only the costs matter)."]
    pooled = seconds["pooled"]
    total = sum(pooled.values())
    lines += ["", f"Pooled host side, {workers} worker processes (`--host_workers={workers}`): map + paste + RLE "
              f"{pooled['map + paste + RLE']:.2f} s (the workers' start included), result dicts "
              f"{pooled['result dicts']:.2f} s, COCOeval {pooled['COCOeval']:.2f} s: {total:.2f} s in all, "
              f"{total / plain:.2f}x plain pycocotools COCOeval alone ({total * scale:.0f} s for 5,000 images)."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("eval",), required=True)
    parser.add_argument("--images", type=int, default=500, help="COCO-like validation images to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host_workers", type=int, default=None,
                        help="worker processes of the pooled host side (default: as eval.host_workers)")
    parser.add_argument("--write", action="store_true", help="replace the section in benchmarks/RESULTS.md")
    args = parser.parse_args()
    from timing import head_commit, machine_line, write_section

    commit = head_commit()
    gt, seconds, metrics, workers = measure_eval(args.images, args.seed, args.host_workers)
    section = report_eval(args, gt, seconds, metrics, workers, commit, machine_line())
    print(section)
    if args.write:
        write_section("coco_scale_eval", section)


if __name__ == "__main__":
    main()
