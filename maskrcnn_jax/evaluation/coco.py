"""COCO evaluation: predictions on the eval split -> original-image coordinates and dataset category ids ->
RLE masks -> pycocotools COCOeval (bbox and segm).

Each evaluation writes into the workdir
    eval/step_{step:08d}_results.json     the COCO results JSON (bbox and segmentation per detection)
    eval/step_{step:08d}_per_class.txt    a per-class AP table (AP@[.5:.95], all areas, maxDets = eval.max_dets)
    eval_metrics.jsonl                    one appended line: {"step", "bbox_AP", ..., "segm_ARl"} (METRIC_KEYS)
and, with eval.num_overlays > 0, overlay PNGs of the first validation images in overlays/step_{step:08d}/.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_jax import inference_io, ops
from maskrcnn_jax.data import pipeline
from maskrcnn_jax.data.coco_format import CategoryMap
from maskrcnn_jax.data.transforms import InputOptions

IOU_TYPES = ("bbox", "segm")
# COCOeval.summarize()'s twelve stats, in order. AR100 names COCOeval's third maxDets, whatever its value.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
METRIC_KEYS = tuple(f"{kind}_{name}" for kind in IOU_TYPES for name in STAT_NAMES)
METRICS_FILE = "eval_metrics.jsonl"
# Masks are pasted into a canvas rounded up to this many pixels per side, so that a few compiled paste
# functions serve every original image size; the result is cropped to the image.
PASTE_BUCKET = 128
# Host metadata the predict function carries through so that every process sees every example.
_METADATA = ("image_id", "original_size", "image_scale", "example_valid")


# ----------------------------------------------------------------------------------------------------
# pycocotools.


def _quiet(fn, *args, **kwargs):
    """pycocotools prints progress to stdout; keep it out of the logs."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def load_results(coco_gt: COCO, results: Sequence[Mapping[str, Any]]) -> COCO:
    """COCO.loadRes that also accepts an empty result list (COCO.loadRes indexes results[0])."""
    if results:
        return _quiet(coco_gt.loadRes, copy.deepcopy(list(results)))
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": copy.deepcopy(
        coco_gt.dataset.get("categories", [])), "annotations": []}
    _quiet(coco_dt.createIndex)
    return coco_dt


def run_cocoeval(coco_gt: COCO, results: Sequence[Mapping[str, Any]], iou_type: str,
                 image_ids: Iterable[int] | None = None, max_dets: int = 100) -> COCOeval:
    """COCOeval of `results` (COCO result dicts) for iou_type 'bbox' or 'segm', restricted to `image_ids`,
    with maxDets (1, 10, max_dets). Returns the evaluator after evaluate and accumulate."""
    if max_dets < 10:
        raise ValueError(f"max_dets must be at least 10 (COCOeval sorts maxDets (1, 10, max_dets)), got {max_dets}")
    coco_dt = load_results(coco_gt, [r for r in results if iou_type != "segm" or "segmentation" in r])
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.params.maxDets = [1, 10, int(max_dets)]
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    return evaluator


def _summarize(evaluator: COCOeval, average_precision: bool, iou: float | None, area: str, max_dets: int) -> float:
    p = evaluator.params
    a = p.areaRngLbl.index(area)
    m = list(p.maxDets).index(max_dets)
    if average_precision:
        values = evaluator.eval["precision"][..., a, m]  # [T, R, K]
    else:
        values = evaluator.eval["recall"][..., a, m]  # [T, K]
    if iou is not None:
        values = values[np.flatnonzero(np.isclose(p.iouThrs, iou))]
    values = values[values > -1]
    return float(np.mean(values)) if values.size else -1.0


def summarize(evaluator: COCOeval) -> list[float]:
    """COCOeval.summarize()'s twelve stats (STAT_NAMES), except that every AP uses the configured largest maxDets:
    pycocotools hard-codes 100 for stats[0] and returns -1 there for any other maxDets. Equal to
    COCOeval.stats when maxDets[2] is 100."""
    _, few, most = evaluator.params.maxDets
    stats = [_summarize(evaluator, True, None, "all", most), _summarize(evaluator, True, 0.5, "all", most),
             _summarize(evaluator, True, 0.75, "all", most)]
    stats += [_summarize(evaluator, True, None, area, most) for area in ("small", "medium", "large")]
    stats += [_summarize(evaluator, False, None, "all", n) for n in (1, few, most)]
    stats += [_summarize(evaluator, False, None, area, most) for area in ("small", "medium", "large")]
    return stats


def per_class_ap(evaluator: COCOeval) -> dict[int, float]:
    """AP@[.5:.95] per category id (all areas, the largest maxDets); NaN for a category without ground truth."""
    precision = evaluator.eval["precision"]  # [iou thresholds, recall points, categories, areas, maxDets]
    values = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        values[int(category_id)] = float(np.mean(p)) if p.size else float("nan")
    return values


def coco_metrics(coco_gt: COCO, results: Sequence[Mapping[str, Any]], image_ids: Iterable[int] | None = None,
                 max_dets: int = 100, iou_types: Sequence[str] = IOU_TYPES
                 ) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
    """({'bbox_AP': ..., 'segm_ARl': ...}, {iou_type: {category_id: AP}}) as pycocotools computes them."""
    image_ids = None if image_ids is None else list(image_ids)
    metrics, per_class = {}, {}
    for iou_type in iou_types:
        evaluator = run_cocoeval(coco_gt, results, iou_type, image_ids, max_dets)
        metrics.update({f"{iou_type}_{name}": float(v) for name, v in zip(STAT_NAMES, summarize(evaluator))})
        per_class[iou_type] = per_class_ap(evaluator)
    return metrics, per_class


def format_per_class_table(per_class: Mapping[str, Mapping[int, float]], categories: CategoryMap) -> str:
    kinds = list(per_class)
    width = max([len("category")] + [len(n) for n in categories.names])
    lines = [f"{'category':<{width}}  {'id':>5}  " + "  ".join(f"{k + ' AP':>8}" for k in kinds)]
    for label in range(1, categories.num_classes + 1):
        category_id = categories.category_id(label)
        cells = "  ".join(f"{100 * per_class[k].get(category_id, float('nan')):8.2f}" for k in kinds)
        lines.append(f"{categories.name(label):<{width}}  {category_id:>5}  {cells}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Detections -> COCO results.


def boxes_to_original(boxes: np.ndarray, image_scale: np.ndarray, original_size: np.ndarray) -> np.ndarray:
    """Canvas xyxy boxes [N, 4] -> original-image xyxy (divide by the (sy, sx) scale), clipped to the image."""
    sy, sx = float(image_scale[0]), float(image_scale[1])
    height, width = float(original_size[0]), float(original_size[1])
    out = np.asarray(boxes, np.float64) / np.asarray([sx, sy, sx, sy])
    out[:, 0::2] = np.clip(out[:, 0::2], 0.0, width)
    out[:, 1::2] = np.clip(out[:, 1::2], 0.0, height)
    return out


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """Binary masks [N, h, w] -> COCO RLEs with str counts (JSON-ready)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(np.moveaxis(np.asarray(masks, np.uint8), 0, -1)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


class MaskPaster:
    """ops.paste_masks at original resolution, compiled once per bucketed (height, width)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._compiled = {}

    def __call__(self, masks: np.ndarray, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
        bucket = (-(-height // PASTE_BUCKET) * PASTE_BUCKET, -(-width // PASTE_BUCKET) * PASTE_BUCKET)
        if bucket not in self._compiled:
            self._compiled[bucket] = jax.jit(lambda m, b, size=bucket: ops.paste_masks(m, b, size, self.threshold))
        pasted = self._compiled[bucket](jnp.asarray(masks, jnp.float32), jnp.asarray(boxes, jnp.float32))
        return np.asarray(pasted)[:, :height, :width]


def coco_result(image_id: int, category_id: int, box, score: float, rle: dict | None = None) -> dict[str, Any]:
    """One COCO results entry: an xyxy box becomes COCO's xywh; the RLE, when given, its segmentation."""
    x1, y1, x2, y2 = (float(v) for v in box)
    result = {"image_id": int(image_id), "category_id": int(category_id), "bbox": [x1, y1, x2 - x1, y2 - y1],
              "score": float(score)}
    if rle is not None:
        result["segmentation"] = rle
    return result


def detections_to_results(predictions: Mapping[str, np.ndarray], image_id: int, original_size, image_scale,
                          categories: CategoryMap, paster: Callable | None) -> tuple[list[dict], dict]:
    """One image's fixed-size predictions (boxes [D, 4] canvas, scores, classes 1..K, masks [D, 28, 28],
    valid [D]) -> (COCO result dicts, {'boxes', 'scores', 'labels', 'masks'} in original pixels)."""
    valid = np.asarray(predictions["valid"], bool)
    height, width = int(original_size[0]), int(original_size[1])
    boxes = boxes_to_original(np.asarray(predictions["boxes"])[valid], image_scale, original_size)
    scores = np.asarray(predictions["scores"], np.float64)[valid]
    labels = np.asarray(predictions["classes"], np.int64)[valid]
    category_ids = categories.label_to_category_id_array()[labels]
    if paster is not None and len(boxes):
        # Paste all D slots (a fixed shape for the compiled paste) and keep the valid ones.
        all_boxes = np.zeros((valid.shape[0], 4), np.float32)
        all_boxes[valid] = boxes
        masks = paster(np.asarray(predictions["masks"]), all_boxes, height, width)[valid]
    else:
        masks = np.zeros((len(boxes), height, width), bool)
    rles = encode_masks(masks) if paster is not None else [None] * len(boxes)
    results = [coco_result(image_id, category_id, box, score, rle)
               for box, score, category_id, rle in zip(boxes, scores, category_ids, rles)]
    return results, {"boxes": boxes, "scores": scores, "labels": labels, "masks": masks}


# ----------------------------------------------------------------------------------------------------
# The evaluator.


def ground_truth_json(data_config: ml_collections.ConfigDict, builder) -> str:
    """The annotation JSON of the evaluation split: data.val_json, else the one the dataset was built from."""
    if data_config.val_json:
        return data_config.val_json
    sources = builder.info.metadata.get("sources", {})
    if data_config.eval_split in sources:
        return sources[data_config.eval_split]["json"]
    raise ValueError(f"no annotation JSON for split '{data_config.eval_split}': set data.val_json")


class Evaluator:
    """Runs the model over the eval split on the mesh and scores it with COCOeval (process 0 writes files)."""

    def __init__(self, config: ml_collections.ConfigDict, builder, categories: CategoryMap, mesh: Mesh, model,
                 workdir: str):
        self.config = config
        self.builder = builder
        self.categories = categories
        self.mesh = mesh
        self.workdir = workdir
        self.options = InputOptions.from_config(config.data)
        self.coco_gt = None
        if config.eval.get("mask_paste", "detectron2") == "detectron2":
            self.paster = MaskPaster(config.eval.mask_threshold)
        else:  # the other rules are pasted on the host, as the Predictor does
            self.paster = functools.partial(inference_io.paste_masks, threshold=config.eval.mask_threshold,
                                            rule=config.eval.mask_paste)
        batch_sharding = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())

        def predict(variables, batch):
            out = model.apply(variables, batch["image"], batch["image_size"], method=model.predict)
            return {**out, **{k: batch[k] for k in _METADATA}}

        # Outputs are replicated, so every process holds every example's detections (an all-gather).
        self._predict = jax.jit(predict, in_shardings=(replicated, batch_sharding), out_shardings=replicated)

    def _gt(self) -> COCO:
        if self.coco_gt is None:
            self.coco_gt = _quiet(COCO, ground_truth_json(self.config.data, self.builder))
        return self.coco_gt

    def predictions(self, variables) -> Iterable[dict[str, np.ndarray]]:
        """Per-image predictions (with image_id, original_size, image_scale) of the whole eval split."""
        from maskrcnn_jax.train import global_batch  # the train module owns batch assembly

        local_batch_size = self.config.eval.batch_size // jax.process_count()
        batches = pipeline.eval_batches(self.builder, self.options, batch_size=local_batch_size,
                                        shard_index=jax.process_index(), shard_count=jax.process_count(),
                                        split=self.config.data.eval_split)
        for local in batches:
            if np.any(np.abs(local["image_id"]) >= 2 ** 31):
                raise ValueError("image ids must fit in int32 to travel through the device")
            local = {**local, "image_id": local["image_id"].astype(np.int32)}
            out = jax.device_get(self._predict(variables, global_batch(
                local, self.mesh, keys=("image", "image_size") + _METADATA)))
            for i in range(out["image_id"].shape[0]):
                if out["example_valid"][i]:
                    yield {k: v[i] for k, v in out.items()}

    def evaluate(self, variables, step: int) -> dict[str, float]:
        """Predicts, scores, writes the files (process 0) and returns {METRIC_KEYS: value}."""
        c = self.config.eval
        results, image_ids, overlays = [], [], []
        for prediction in self.predictions(variables):
            image_id = int(prediction["image_id"])
            image_results, detections = detections_to_results(
                prediction, image_id, prediction["original_size"], prediction["image_scale"], self.categories,
                self.paster)
            results.extend(image_results)
            image_ids.append(image_id)
            if len(overlays) < c.num_overlays:
                overlays.append((image_id, detections))
        metrics, per_class = coco_metrics(self._gt(), results, image_ids, c.max_dets)
        if jax.process_index() == 0:
            self._write(step, results, metrics, per_class, overlays)
        logging.info("evaluation at step %d on %d images: box AP %.4f, mask AP %.4f", step, len(image_ids),
                     metrics["bbox_AP"], metrics["segm_AP"])
        return metrics

    def _write(self, step, results, metrics, per_class, overlays):
        eval_dir = os.path.join(self.workdir, "eval")
        os.makedirs(eval_dir, exist_ok=True)
        with open(os.path.join(eval_dir, f"step_{step:08d}_results.json"), "w") as f:
            json.dump(results, f)
        table = format_per_class_table(per_class, self.categories)
        with open(os.path.join(eval_dir, f"step_{step:08d}_per_class.txt"), "w") as f:
            f.write(table)
        logging.info("per-class AP at step %d:\n%s", step, table)
        with open(os.path.join(self.workdir, METRICS_FILE), "a") as f:
            f.write(json.dumps({"step": int(step), **{k: metrics[k] for k in METRIC_KEYS}}) + "\n")
        if overlays:
            from maskrcnn_jax import visualize

            visualize.write_overlays(
                os.path.join(self.workdir, "overlays", f"step_{step:08d}"), overlays, self._gt(),
                self.config.data.val_images, self.categories, self.config.eval.overlay_score_threshold)
