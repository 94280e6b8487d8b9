"""COCOeval wrappers and result encoding: one image's detections -> COCO results (original pixels, the dataset's
category ids, RLE masks, keypoints), and COCOeval's numbers (bbox, segm, keypoints) with a per-class AP table.

COCOeval runs on faster-coco-eval (a compiled drop-in for pycocotools' COCOeval, the same numbers) where it is
installed, else on pycocotools; `backend=` picks one."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import weakref
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_jax.data.coco_format import CategoryMap
from maskrcnn_jax.evaluation import result_arrays
from maskrcnn_jax.serving import host

IOU_TYPES = ("bbox", "segm")
# COCOeval.summarize()'s twelve stats, in order. AR100 names COCOeval's third maxDets, whatever its value.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
METRIC_KEYS = tuple(f"{kind}_{name}" for kind in IOU_TYPES for name in STAT_NAMES)
# COCOeval's ten keypoint stats (OKS instead of IoU, 20 detections per image, no small objects).
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
# COCO's 17 person keypoints' OKS sigmas, pycocotools' default.
COCO_OKS_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087,
                   0.087, 0.089, 0.089)


def iou_types(model_config) -> tuple[str, ...]:
    """What a model is scored on: boxes, and masks and keypoints when it predicts them."""
    return ("bbox",) + (("segm",) if model_config.mask_on else ()) + (("keypoints",) if model_config.keypoint_on
                                                                       else ())


def metric_keys(kinds: Sequence[str]) -> tuple[str, ...]:
    """The eval_metrics.jsonl keys of these iou types: bbox_AP, ..., keypoints_ARl."""
    return tuple(f"{kind}_{name}" for kind in kinds
                 for name in (KEYPOINT_STAT_NAMES if kind == "keypoints" else STAT_NAMES))


_HEADLINE_NAMES = {"bbox": "box", "segm": "mask", "keypoints": "keypoint"}


def headline(metrics: Mapping[str, float]) -> str:
    """'box AP 0.6225, mask AP 0.5440, keypoint AP 0.5908': the AP of every iou type the metrics hold."""
    return ", ".join(f"{name} AP {metrics[kind + '_AP']:.4f}" for kind, name in _HEADLINE_NAMES.items()
                     if kind + "_AP" in metrics)


def oks_sigmas(configured: Sequence[float], dataset_sigmas: Sequence[float] | None, num_keypoints: int
               ) -> tuple[float, ...]:
    """The OKS sigmas COCOeval uses: the config's (eval.kpt_oks_sigmas), else the dataset's, else COCO's 17 when
    there are 17 keypoints; otherwise there is no meaningful default and it is an error."""
    sigmas = tuple(configured) or tuple(dataset_sigmas or ()) or (COCO_OKS_SIGMAS if num_keypoints == 17 else ())
    if len(sigmas) != num_keypoints:
        raise ValueError(f"keypoint evaluation needs {num_keypoints} OKS sigmas, one per keypoint type, got "
                         f"{len(sigmas)}: set eval.kpt_oks_sigmas, or give them in the dataset's category as "
                         "kpt_oks_sigmas (COCO's 17 are the default only for 17 keypoints)")
    return sigmas


# ----------------------------------------------------------------------------------------------------
# pycocotools.


def quiet(fn, *args, **kwargs):
    """pycocotools prints progress to stdout; keep it out of the logs."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def load_results(coco_gt: COCO, results: Sequence[Mapping[str, Any]]) -> COCO:
    """COCO.loadRes that also accepts an empty result list (COCO.loadRes indexes results[0]). loadRes only adds
    keys to each result (area, id, iscrowd) and never writes into their values, so shallow copies keep the
    caller's results unchanged."""
    if results:
        return quiet(coco_gt.loadRes, [dict(r) for r in results])
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": copy.deepcopy(
        coco_gt.dataset.get("categories", [])), "annotations": []}
    quiet(coco_dt.createIndex)
    return coco_dt


COCOEVAL_BACKENDS = ("faster_coco_eval", "pycocotools")


def default_backend() -> str:
    return "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"


# faster-coco-eval's own COCO index of each pycocotools ground truth, built once per ground truth.
_FASTER_GROUND_TRUTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _faster_ground_truth(coco_gt: COCO):
    twin = _FASTER_GROUND_TRUTHS.get(coco_gt)
    if twin is None:
        from faster_coco_eval import COCO as FasterCOCO

        twin = FasterCOCO(print_function=lambda *args: None)
        twin.dataset = coco_gt.dataset
        twin.createIndex()
        _FASTER_GROUND_TRUTHS[coco_gt] = twin
    return twin


def _evaluator(coco_gt: COCO, results: list[dict[str, Any]], iou_type: str, backend: str):
    if backend == "pycocotools":
        return COCOeval(coco_gt, load_results(coco_gt, results), iou_type)
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCOeval_faster

        twin = _faster_ground_truth(coco_gt)
        detections = twin.loadRes([dict(r) for r in results])
        return COCOeval_faster(twin, detections, iou_type, print_function=lambda *args: None)
    raise ValueError(f"COCOeval backend must be one of {COCOEVAL_BACKENDS}, got {backend!r}")


def run_cocoeval(coco_gt: COCO, results: Sequence[Mapping[str, Any]], iou_type: str,
                 image_ids: Iterable[int] | None = None, max_dets: int = 100,
                 sigmas: Sequence[float] | None = None, backend: str | None = None):
    """COCOeval of `results` (COCO result dicts) for iou_type 'bbox', 'segm' (maxDets 1, 10, max_dets) or
    'keypoints' (COCOeval's 20 detections per image, OKS with `sigmas`), restricted to `image_ids`, on `backend`
    (COCOEVAL_BACKENDS; default_backend() when None). Returns the evaluator after evaluate and accumulate."""
    if max_dets < 10:
        raise ValueError(f"max_dets must be at least 10 (COCOeval sorts maxDets (1, 10, max_dets)), got {max_dets}")
    needed = {"segm": "segmentation", "keypoints": "keypoints"}.get(iou_type)
    scored = [r for r in results if needed is None or needed in r]
    if iou_type == "segm":
        # With a bbox, loadRes takes a result's area from the box, and APs/APm/APl would bin masks by box area;
        # without one it takes the mask's area, as detectron2's evaluator (which drops the box) and torchvision's
        # reference (which writes none) do.
        scored = [{k: v for k, v in r.items() if k != "bbox"} for r in scored]
    evaluator = _evaluator(coco_gt, scored, iou_type, backend or default_backend())
    if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    if iou_type == "keypoints":
        evaluator.params.kpt_oks_sigmas = np.asarray(sigmas if sigmas is not None else COCO_OKS_SIGMAS)
    else:
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


def summarize_keypoints(evaluator) -> list[float]:
    """COCOeval.summarize()'s ten keypoint stats (KEYPOINT_STAT_NAMES) at its 20 detections per image, read off
    the accumulated arrays as pycocotools does, whichever backend ran."""
    most = evaluator.params.maxDets[-1]
    stats = [_summarize(evaluator, True, iou, "all", most) for iou in (None, 0.5, 0.75)]
    stats += [_summarize(evaluator, True, None, area, most) for area in ("medium", "large")]
    stats += [_summarize(evaluator, False, iou, "all", most) for iou in (None, 0.5, 0.75)]
    stats += [_summarize(evaluator, False, None, area, most) for area in ("medium", "large")]
    return stats


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
                 max_dets: int = 100, iou_types: Sequence[str] = IOU_TYPES, sigmas: Sequence[float] | None = None,
                 backend: str | None = None) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
    """({'bbox_AP': ..., 'segm_ARl': ..., 'keypoints_AP': ...}, {iou_type: {category_id: AP}}) as pycocotools
    computes them (keypoints: COCOeval.summarize's ten stats, KEYPOINT_STAT_NAMES), on `backend`."""
    image_ids = None if image_ids is None else list(image_ids)
    metrics, per_class = {}, {}
    for iou_type in iou_types:
        evaluator = run_cocoeval(coco_gt, results, iou_type, image_ids, max_dets, sigmas, backend)
        if iou_type == "keypoints":
            metrics.update({f"keypoints_{n}": v for n, v in zip(KEYPOINT_STAT_NAMES, summarize_keypoints(evaluator))})
        else:
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


def _crop_run_lengths(crop: host.MaskCrop, height: int, width: int) -> list[int]:
    """The uncompressed COCO RLE counts (column-major runs, zeros first) of a crop's full height x width mask,
    read off the crop alone."""
    pixels = np.asarray(crop.pixels, bool)
    if not pixels.any():
        return [height * width]
    h, w = pixels.shape
    # Each crop column, framed by a False on both sides: +1 steps start runs of ones, -1 steps end them.
    framed = np.zeros((w, h + 2), np.int8)
    framed[:, 1:-1] = pixels.T
    steps = np.diff(framed, axis=1)  # [w, h + 1], row-major order = the image's column-major order
    column_offsets = (crop.left + np.arange(w, dtype=np.int64))[:, None] * height + crop.top
    starts = (column_offsets + np.arange(h + 1))[steps == 1]
    ends = (column_offsets + np.arange(h + 1))[steps == -1]
    # A run that ends at the image's bottom row and one that starts at the next column's top row are one run.
    joined = ends[:-1] == starts[1:]
    starts = starts[np.concatenate([[True], ~joined])]
    ends = ends[np.concatenate([~joined, [True]])]
    boundaries = np.stack([starts, ends], axis=1).reshape(-1)
    if boundaries[-1] < height * width:  # no closing empty run after a mask that reaches the last pixel
        boundaries = np.append(boundaries, height * width)
    return np.diff(boundaries, prepend=0).tolist()


def mask_crop_counts(crops: Sequence[host.MaskCrop], height: int, width: int) -> list[bytes]:
    """MaskCrops of a height x width image -> their compressed COCO RLE counts (encode_mask_crops' bytes)."""
    if len(crops) == 0:
        return []
    runs = [{"counts": _crop_run_lengths(crop, height, width), "size": [height, width]} for crop in crops]
    return [rle["counts"] for rle in mask_utils.frPyObjects(runs, height, width)]


def encode_mask_crops(crops: Sequence[host.MaskCrop], height: int, width: int) -> list[dict[str, Any]]:
    """MaskCrops of a height x width image -> COCO RLEs with str counts, bit for bit encode_masks of their full
    masks, without writing or scanning the pixels outside each crop."""
    return [{"size": [height, width], "counts": counts.decode("ascii")}
            for counts in mask_crop_counts(crops, height, width)]


def coco_result(image_id: int, category_id: int, box, score: float, rle: dict | None = None,
                keypoints=None) -> dict[str, Any]:
    """One COCO results entry: an xyxy box becomes COCO's xywh; the RLE, when given, its segmentation; keypoints
    [K, 3] (x, y, score), when given, the flat `keypoints` list."""
    x1, y1, x2, y2 = (float(v) for v in box)
    result = {"image_id": int(image_id), "category_id": int(category_id), "bbox": [x1, y1, x2 - x1, y2 - y1],
              "score": float(score)}
    if rle is not None:
        result["segmentation"] = rle
    if keypoints is not None:
        result["keypoints"] = [float(v) for v in np.asarray(keypoints).reshape(-1)]
    return result


def image_result_arrays(predictions: Mapping[str, np.ndarray], image_id: int, image_size, original_size,
                        spec: host.InferenceSpec) -> tuple[dict[str, np.ndarray], dict]:
    """One image's fixed-size predictions (MaskRCNN.predict's outputs for it) -> (its COCO results as
    result_arrays, the detections in original pixels: {'boxes', 'scores', 'labels' (category ids), 'names',
    'mask_crops', 'keypoints'}). Exactly the Predictor's results (serving.host.image_results with `spec`), with no
    score threshold; the masks stay crops (host.full_masks makes images of them), and their RLEs are read off the
    crops."""
    prepared = host.PreparedImage(None, tuple(int(v) for v in image_size), tuple(int(v) for v in original_size))
    detections = host.image_results(predictions, prepared, spec, score_threshold=-np.inf, mask_crops=True)
    counts = None
    if "mask_crops" in detections:
        counts = mask_crop_counts(detections["mask_crops"], *prepared.original_size)
    arrays = result_arrays.image_arrays(image_id, detections["labels"], detections["scores"], detections["boxes"],
                                        counts, prepared.original_size, detections.get("keypoints"))
    return arrays, detections


def detections_to_results(predictions: Mapping[str, np.ndarray], image_id: int, image_size, original_size,
                          spec: host.InferenceSpec) -> tuple[list[dict], dict]:
    """image_result_arrays with the results as COCO result dicts (coco_result's)."""
    arrays, detections = image_result_arrays(predictions, image_id, image_size, original_size, spec)
    return result_arrays.to_results(arrays), detections
