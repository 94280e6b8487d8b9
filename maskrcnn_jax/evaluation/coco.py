"""pycocotools wrappers and result encoding: one image's detections -> COCO results (original pixels, the dataset's
category ids, RLE masks), and COCOeval's numbers (bbox and segm) with a per-class AP table."""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_jax.data.coco_format import CategoryMap
from maskrcnn_jax.serving import host

IOU_TYPES = ("bbox", "segm")
# COCOeval.summarize()'s twelve stats, in order. AR100 names COCOeval's third maxDets, whatever its value.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
METRIC_KEYS = tuple(f"{kind}_{name}" for kind in IOU_TYPES for name in STAT_NAMES)


# ----------------------------------------------------------------------------------------------------
# pycocotools.


def quiet(fn, *args, **kwargs):
    """pycocotools prints progress to stdout; keep it out of the logs."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def load_results(coco_gt: COCO, results: Sequence[Mapping[str, Any]]) -> COCO:
    """COCO.loadRes that also accepts an empty result list (COCO.loadRes indexes results[0])."""
    if results:
        return quiet(coco_gt.loadRes, copy.deepcopy(list(results)))
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": copy.deepcopy(
        coco_gt.dataset.get("categories", [])), "annotations": []}
    quiet(coco_dt.createIndex)
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
    quiet(evaluator.evaluate)
    quiet(evaluator.accumulate)
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


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """Binary masks [N, h, w] -> COCO RLEs with str counts (JSON-ready)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(np.moveaxis(np.asarray(masks, np.uint8), 0, -1)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def coco_result(image_id: int, category_id: int, box, score: float, rle: dict | None = None) -> dict[str, Any]:
    """One COCO results entry: an xyxy box becomes COCO's xywh; the RLE, when given, its segmentation."""
    x1, y1, x2, y2 = (float(v) for v in box)
    result = {"image_id": int(image_id), "category_id": int(category_id), "bbox": [x1, y1, x2 - x1, y2 - y1],
              "score": float(score)}
    if rle is not None:
        result["segmentation"] = rle
    return result


def detections_to_results(predictions: Mapping[str, np.ndarray], image_id: int, image_size, original_size,
                          categories: CategoryMap, mask_threshold: float = 0.5, mask_paste: str = "detectron2"
                          ) -> tuple[list[dict], dict]:
    """One image's fixed-size predictions (boxes [D, 4] canvas, scores, classes 1..K, masks [D, 28, 28],
    valid [D]) -> (COCO result dicts, {'boxes', 'scores', 'labels', 'masks'} in original pixels). The boxes are
    mapped and the masks pasted exactly as the Predictor does (serving.host)."""
    valid = np.asarray(predictions["valid"], bool)
    height, width = int(original_size[0]), int(original_size[1])
    boxes = host.boxes_to_original(np.asarray(predictions["boxes"])[valid], image_size, original_size)
    scores = np.asarray(predictions["scores"], np.float32)[valid]
    labels = np.asarray(predictions["classes"], np.int64)[valid]
    category_ids = categories.label_to_category_id_array()[labels]
    masks = host.paste_masks(np.asarray(predictions["masks"])[valid], boxes, height, width, mask_threshold,
                             mask_paste)
    results = [coco_result(image_id, category_id, box, score, rle)
               for box, score, category_id, rle in zip(boxes, scores, category_ids, encode_masks(masks))]
    return results, {"boxes": boxes, "scores": scores, "labels": labels, "masks": masks}
