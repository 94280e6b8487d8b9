"""COCO evaluation: our metrics equal a direct pycocotools call on handmade detections, and detections make the
round trip canvas -> original pixels -> dataset category ids -> RLE -> COCOeval."""

import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_jax import config as config_lib
from maskrcnn_jax.evaluation import coco as evaluation
from maskrcnn_jax.serving import host
from maskrcnn_jax.serving.predictor import spec_from_config
from maskrcnn_jax.data.coco_format import CategoryMap

# Non-contiguous ids, as COCO's 1..90 with gaps.
CATEGORY_IDS = (3, 17, 42)
CATEGORIES = CategoryMap(CATEGORY_IDS, ("cat", "dog", "owl"))


def rle(mask):
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    encoded["counts"] = encoded["counts"].decode("ascii")
    return encoded


def make_ground_truth(rng, num_images=6):
    """Random rectangles and ellipses (some crowd, some tiny/large) on images of random sizes."""
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        height, width = (int(v) for v in rng.integers(60, 400, size=2))
        images.append({"id": image_id * 7, "file_name": f"{image_id}.jpg", "height": height, "width": width})
        for _ in range(rng.integers(0, 5)):
            x1, y1 = rng.uniform(0, width - 10), rng.uniform(0, height - 10)
            x2, y2 = rng.uniform(x1 + 4, width), rng.uniform(y1 + 4, height)
            yy, xx = np.mgrid[:height, :width] + 0.5
            if rng.uniform() < 0.5:
                mask = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
            else:
                cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
                mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
            if not mask.any():
                continue
            ys, xs = np.nonzero(mask)
            box = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id * 7,
                                "category_id": int(rng.choice(CATEGORY_IDS)), "bbox": box,
                                "area": float(mask.sum()), "iscrowd": int(rng.uniform() < 0.1),
                                "segmentation": rle(mask)})
    dataset = {"images": images, "annotations": annotations,
               "categories": [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, CATEGORIES.names)]}
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def jitter_results(coco, rng):
    """Detections near the ground truth (and some false positives), with random scores."""
    results = []
    for annotation in coco.dataset["annotations"]:
        image = coco.imgs[annotation["image_id"]]
        for _ in range(rng.integers(0, 3)):
            x, y, w, h = annotation["bbox"]
            dx, dy = rng.normal(0, 0.1 * w), rng.normal(0, 0.1 * h)
            box = [x + dx, y + dy, w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
            mask = np.zeros((image["height"], image["width"]), bool)
            x1, y1 = int(max(box[0], 0)), int(max(box[1], 0))
            mask[y1:int(box[1] + box[3]), x1:int(box[0] + box[2])] = True
            category = annotation["category_id"] if rng.uniform() < 0.8 else int(rng.choice(CATEGORY_IDS))
            results.append({"image_id": annotation["image_id"], "category_id": category, "bbox": box,
                            "score": float(rng.uniform()), "segmentation": rle(mask)})
    return results


def direct_stats(coco, results, iou_type, image_ids=None):
    """pycocotools' stats as detectron2's COCOEvaluator calls it: segm results without their boxes."""
    if iou_type == "segm":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


@pytest.mark.parametrize("backend", evaluation.COCOEVAL_BACKENDS)
def test_metrics_equal_a_direct_pycocotools_call(rng, backend):
    """Every stat and every per-class AP, on either backend, is pycocotools' own: bit for bit on pycocotools,
    to float64 rounding (summed in another order) on faster-coco-eval."""
    coco = make_ground_truth(rng, num_images=12)
    results = jitter_results(coco, rng)
    assert results
    metrics, per_class = evaluation.coco_metrics(coco, results, max_dets=100, backend=backend)
    _, reference_per_class = evaluation.coco_metrics(coco, results, max_dets=100, backend="pycocotools")
    assert list(metrics) == list(evaluation.METRIC_KEYS)
    tolerance = 0 if backend == "pycocotools" else 1e-15
    for iou_type in ("bbox", "segm"):
        expected = direct_stats(coco, results, iou_type)
        ours = [metrics[f"{iou_type}_{name}"] for name in evaluation.STAT_NAMES]
        assert len(set(ours)) > 6  # the data tells the stats apart
        np.testing.assert_allclose(ours, expected, rtol=0, atol=tolerance)
        assert set(per_class[iou_type]) == set(CATEGORY_IDS)
        np.testing.assert_allclose([per_class[iou_type][c] for c in CATEGORY_IDS],
                                   [reference_per_class[iou_type][c] for c in CATEGORY_IDS], rtol=0, atol=tolerance)


def test_faster_coco_eval_is_the_default_backend():
    assert evaluation.default_backend() == "faster_coco_eval"


def test_mask_ap_by_size_bins_results_by_mask_area_not_box_area():
    """A small ground-truth blob and, scored above it, a false-positive diagonal line: its mask covers ~240
    pixels (small, < 32**2) but its box 240x240 (large). Binned by mask area, the line is a small false positive
    ahead of the true one, so APs is 0.5; binned by box area (pycocotools with the box kept) it would be ignored
    in the small range and APs would be 1."""
    height = width = 300
    blob = np.zeros((height, width), bool)
    blob[10:30, 10:30] = True
    line = np.zeros((height, width), bool)
    line[np.arange(50, 290), np.arange(50, 290)] = True
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "file_name": "1.jpg", "height": height, "width": width}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 20.0, 20.0],
                                     "area": float(blob.sum()), "iscrowd": 0, "segmentation": rle(blob)}],
                    "categories": [{"id": 3, "name": "cat"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    results = [{"image_id": 1, "category_id": 3, "bbox": [50.0, 50.0, 240.0, 240.0], "score": 0.9,
                "segmentation": rle(line)},
               {"image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 20.0, 20.0], "score": 0.8,
                "segmentation": rle(blob)}]
    kept = copy.deepcopy(results)
    metrics, _ = evaluation.coco_metrics(coco, results, max_dets=100)
    assert metrics["segm_APs"] == pytest.approx(0.5)
    assert metrics["bbox_APs"] == pytest.approx(1.0)  # boxes are binned by box area: the line's is large
    assert metrics["segm_AP"] == metrics["bbox_AP"]  # over all areas the line is a false positive in both
    assert results == kept  # the caller's results are not modified


@pytest.mark.parametrize("rule", host.MASK_PASTE_RULES)
def test_rles_read_off_the_crops_equal_pycocotools_encode_of_the_full_masks(rng, rule):
    """Bit for bit, for every paste rule: random probabilities in boxes inside the image, across its edges and
    corners (a run that ends on the bottom row joins one that starts on the next column's top row), covering it
    whole, outside it, degenerate, and all-background masks."""
    height, width = 37, 53
    boxes = [rng.uniform([-10, -10, 0, 0], [width, height, 30, 30]) for _ in range(40)]
    boxes = [[x, y, x + w, y + h] for x, y, w, h in boxes]
    boxes += [[-5, -5, width + 5, height + 5], [0, 0, width, height], [-20, -20, -2, -3],
              [width + 1, 3, width + 9, 9], [4, 4, 4, 12], [10, 3, 25, 3], [0, 0, 6, height], [3, 0, 9, height]]
    boxes = np.asarray(boxes, np.float32)
    probabilities = rng.uniform(size=(len(boxes), 28, 28)).astype(np.float32)
    probabilities[-2:] = 1.0  # columns running the image's full height
    probabilities[-10] = 0.0  # nothing pasted
    crops = host.paste_mask_crops(probabilities, boxes, height, width, 0.5, rule)
    masks = host.full_masks(crops, height, width)
    assert masks[-1].all(axis=0).any() and not masks[-10].any()
    assert masks[:, 0, :].any() and masks[:, -1, :].any()
    np.testing.assert_array_equal(masks, host.paste_masks(probabilities, boxes, height, width, 0.5, rule))
    assert evaluation.encode_mask_crops(crops, height, width) == evaluation.encode_masks(masks)
    corner = np.zeros((3, 4), bool)
    corner[-1, -1] = True  # the image's last pixel
    special = [host.MaskCrop(0, 0, np.ones((height, width), bool)), host.MaskCrop(0, 0, np.zeros((0, 0), bool)),
               host.MaskCrop(height - 3, width - 4, corner)]
    assert evaluation.encode_mask_crops(special, height, width) == evaluation.encode_masks(
        host.full_masks(special, height, width))


def test_image_subset_matches_pycocotools_image_ids(rng):
    coco = make_ground_truth(rng)
    results = jitter_results(coco, rng)
    subset = sorted(coco.getImgIds())[:3]
    metrics, _ = evaluation.coco_metrics(coco, [r for r in results if r["image_id"] in subset], subset)
    expected = direct_stats(coco, [r for r in results if r["image_id"] in subset] or results, "bbox", subset)
    np.testing.assert_allclose([metrics[f"bbox_{n}"] for n in evaluation.STAT_NAMES], expected, rtol=0, atol=1e-15)


def test_configurable_max_dets_changes_every_ap(rng):
    coco = make_ground_truth(rng, num_images=4)
    results = jitter_results(coco, rng)
    few, _ = evaluation.coco_metrics(coco, results, max_dets=10, iou_types=("bbox",))
    many, _ = evaluation.coco_metrics(coco, results, max_dets=100, iou_types=("bbox",))
    # pycocotools' own summarize reports -1 for AP whenever maxDets[2] != 100; ours uses the configured value.
    assert 0 <= few["bbox_AP"] <= many["bbox_AP"]
    assert few["bbox_AR100"] == few["bbox_AR10"]  # "AR100" is the AR at the configured maxDets
    with pytest.raises(ValueError, match="max_dets"):
        evaluation.coco_metrics(coco, results, max_dets=5)


def test_per_class_ap_averages_to_the_overall_ap(rng):
    coco = make_ground_truth(rng, num_images=8)
    results = jitter_results(coco, rng)
    metrics, per_class = evaluation.coco_metrics(coco, results)
    values = [v for v in per_class["segm"].values() if not np.isnan(v)]
    assert np.mean(values) == pytest.approx(metrics["segm_AP"])
    table = evaluation.format_per_class_table(per_class, CATEGORIES)
    assert all(name in table for name in CATEGORIES.names) and "42" in table


def test_no_detections_score_zero_instead_of_crashing(rng):
    coco = make_ground_truth(rng, num_images=3)
    metrics, _ = evaluation.coco_metrics(coco, [])
    assert all(metrics[k] in (0.0, -1.0) for k in evaluation.METRIC_KEYS)
    assert metrics["bbox_AP"] == 0.0


def test_detections_round_trip_to_original_pixels_and_dataset_ids(rng):
    """Perfect predictions on the canvas (GT rectangles scaled into it, full masks) score AP 1 in both kinds,
    and every result carries the dataset's own category id."""
    height, width = 150, 230
    scale = np.asarray([0.8, 0.8], np.float32)  # (sy, sx): canvas = original * scale
    gt_boxes, labels, annotations = [], [], []
    for k, (x1, y1, x2, y2) in enumerate([(10, 20, 60, 90), (100, 30, 200, 140), (150, 5, 225, 40)]):
        label = k + 1
        mask = np.zeros((height, width), bool)
        mask[y1:y2, x1:x2] = True
        annotations.append({"id": k + 1, "image_id": 5, "category_id": CATEGORIES.category_id(label),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(mask.sum()), "iscrowd": 0,
                            "segmentation": rle(mask)})
        gt_boxes.append((x1, y1, x2, y2))
        labels.append(label)
    coco = COCO()
    coco.dataset = {"images": [{"id": 5, "height": height, "width": width, "file_name": "5.jpg"}],
                    "annotations": annotations,
                    "categories": [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, CATEGORIES.names)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()

    slots = 6  # fixed-size model output with invalid padding slots
    boxes = np.zeros((slots, 4), np.float32)
    boxes[:3] = np.asarray(gt_boxes, np.float32) * np.tile(scale[::-1], 2)
    predictions = {
        "boxes": boxes,
        "scores": np.asarray([0.9, 0.8, 0.7, 0.5, 0.4, 0.3], np.float32),
        "classes": np.asarray(labels + [1, 2, 3], np.int32),
        "masks": np.ones((slots, 28, 28), np.float32),
        "valid": np.asarray([True, True, True, False, False, False]),
    }
    image_size = np.round(np.asarray([height, width]) * scale).astype(np.int32)  # the image's window on the canvas
    spec = spec_from_config(config_lib.base_config(), CATEGORIES, batch_size=1)
    results, detections = evaluation.detections_to_results(predictions, 5, image_size, (height, width), spec)
    assert [r["category_id"] for r in results] == [3, 17, 42]
    np.testing.assert_allclose([r["bbox"] for r in results], [a["bbox"] for a in annotations], atol=1e-4)
    for result, annotation in zip(results, annotations):
        # Equal up to the box-edge pixels, where bilinear pasting sits at the 0.5 threshold.
        iou = mask_utils.iou([result["segmentation"]], [annotation["segmentation"]], [0])[0, 0]
        assert iou > 0.98
    assert host.full_masks(detections["mask_crops"], height, width).shape == (3, height, width)
    metrics, _ = evaluation.coco_metrics(coco, results)
    assert metrics["bbox_AP"] == pytest.approx(1.0) and metrics["segm_AP"] == pytest.approx(1.0)


def test_boxes_to_original_scales_by_original_over_resized_and_clips():
    boxes = np.asarray([[10, 20, 50, 60], [-5, -5, 400, 300]], np.float32)
    out = host.boxes_to_original(boxes, np.asarray([200, 60]), np.asarray([100, 120]))
    np.testing.assert_allclose(out[0], [20, 10, 100, 30])
    np.testing.assert_allclose(out[1], [0, 0, 120, 100])


def test_keypoint_detections_round_trip_and_score_oks_ap_one(rng):
    """Heatmaps peaked at the ground-truth keypoints (in canvas pixels) decode, map back to the original image and
    score keypoint AP 1 with the dataset's sigmas; the results carry COCO's flat keypoint lists."""
    from maskrcnn_jax.data.keypoints import KeypointSchema

    height, width, scale, num_keypoints, m = 120, 160, 0.5, 3, 56
    schema = KeypointSchema(("head", "left_hand", "right_hand"), ((0, 1), (0, 2)), (0.05, 0.05, 0.05), (3,))
    people = [(10.0, 20.0, 70.0, 110.0), (90.0, 10.0, 150.0, 100.0)]
    annotations, heatmaps, boxes = [], np.full((4, m, m, num_keypoints), -10.0, np.float32), np.zeros((4, 4))
    for k, (x1, y1, x2, y2) in enumerate(people):
        points = np.stack([rng.uniform(x1 + 5, x2 - 5, num_keypoints), rng.uniform(y1 + 5, y2 - 5, num_keypoints),
                           np.full(num_keypoints, 2.0)], 1)
        annotations.append({"id": k + 1, "image_id": 9, "category_id": 3, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "area": (x2 - x1) * (y2 - y1), "iscrowd": 0, "num_keypoints": num_keypoints,
                            "keypoints": points.reshape(-1).tolist()})
        boxes[k] = np.asarray([x1, y1, x2, y2]) * scale
        for j, (x, y, _) in enumerate(points):  # the heatmap cell whose decoded centre is nearest the keypoint
            column = int((x * scale - boxes[k, 0]) / (boxes[k, 2] - boxes[k, 0]) * m)
            row = int((y * scale - boxes[k, 1]) / (boxes[k, 3] - boxes[k, 1]) * m)
            heatmaps[k, min(row, m - 1), min(column, m - 1), j] = 10.0
    coco = COCO()
    coco.dataset = {"images": [{"id": 9, "height": height, "width": width, "file_name": "9.jpg"}],
                    "annotations": annotations,
                    "categories": [{"id": c, "name": n, "keypoints": list(schema.names), "skeleton": [[1, 2], [1, 3]]}
                                   for c, n in zip(CATEGORY_IDS, CATEGORIES.names)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    config = config_lib.base_config()
    config.model.keypoint_on = True
    config.model.mask_on = False
    spec = spec_from_config(config, CATEGORIES, batch_size=1, keypoint_schema=schema)
    predictions = {"boxes": boxes.astype(np.float32), "scores": np.asarray([0.9, 0.8, 0.1, 0.1], np.float32),
                   "classes": np.asarray([1, 1, 2, 2], np.int32), "valid": np.asarray([True, True, False, False]),
                   "keypoint_heatmaps": heatmaps}
    image_size = (int(height * scale), int(width * scale))
    results, detections = evaluation.detections_to_results(predictions, 9, image_size, (height, width), spec)
    assert "masks" not in detections and detections["keypoints"].shape == (2, num_keypoints, 3)
    assert all(len(r["keypoints"]) == 3 * num_keypoints and "segmentation" not in r for r in results)
    for result, annotation in zip(results, annotations):
        error = np.abs(np.asarray(result["keypoints"]).reshape(-1, 3)[:, :2]
                       - np.asarray(annotation["keypoints"]).reshape(-1, 3)[:, :2])
        assert error.max() <= 2.0 / scale  # within a heatmap cell of the box (< 2 canvas pixels here)
    metrics, per_class = evaluation.coco_metrics(coco, results, iou_types=("bbox", "keypoints"),
                                                 sigmas=schema.oks_sigmas)
    assert list(metrics)[-10:] == [f"keypoints_{n}" for n in evaluation.KEYPOINT_STAT_NAMES]
    assert metrics["keypoints_AP"] == pytest.approx(1.0) and metrics["bbox_AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", evaluation.COCOEVAL_BACKENDS)
def test_keypoint_stats_equal_pycocotools_summarize(rng, backend):
    """Random people (medium and large, some keypoints unlabelled) and noisy detections with false positives:
    the ten keypoint stats on either backend are pycocotools' own COCOeval.summarize()."""
    sigmas = (0.03, 0.05, 0.07, 0.09)
    images, annotations, results = [], [], []
    for image_id in range(1, 9):
        images.append({"id": image_id, "height": 400, "width": 500, "file_name": f"{image_id}.jpg"})
        for _ in range(rng.integers(1, 4)):
            x1, y1 = rng.uniform(0, 250, 2)
            w, h = rng.uniform(40, 240, 2)
            points = np.stack([rng.uniform(x1, x1 + w, 4), rng.uniform(y1, y1 + h, 4),
                               rng.choice([0, 1, 2], 4, p=[0.2, 0.3, 0.5]).astype(float)], 1)
            points[points[:, 2] == 0, :2] = 0
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 3,
                                "bbox": [x1, y1, w, h], "area": w * h * 0.6, "iscrowd": 0,
                                "num_keypoints": int((points[:, 2] > 0).sum()),
                                "keypoints": points.reshape(-1).tolist()})
            for _ in range(rng.integers(0, 3)):
                noisy = points[:, :2] + rng.normal(0, rng.uniform(1, 15), (4, 2))
                detected = np.concatenate([noisy, rng.uniform(0, 1, (4, 1))], 1)
                results.append({"image_id": image_id, "category_id": 3, "score": float(rng.uniform()),
                                "bbox": [x1, y1, w, h], "keypoints": detected.reshape(-1).tolist()})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": 3, "name": "person", "keypoints": ["a", "b", "c", "d"], "skeleton": []}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        reference = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "keypoints")
        reference.params.kpt_oks_sigmas = np.asarray(sigmas)
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    metrics, _ = evaluation.coco_metrics(coco, results, iou_types=("keypoints",), sigmas=sigmas, backend=backend)
    ours = [metrics[f"keypoints_{n}"] for n in evaluation.KEYPOINT_STAT_NAMES]
    assert len(set(ours)) > 5  # the data tells the stats apart
    np.testing.assert_allclose(ours, reference.stats, rtol=0, atol=0 if backend == "pycocotools" else 1e-15)


def test_oks_sigmas_come_from_the_config_the_dataset_or_coco():
    assert evaluation.oks_sigmas((), None, 17) == evaluation.COCO_OKS_SIGMAS
    assert evaluation.oks_sigmas((), (0.1, 0.2), 2) == (0.1, 0.2)
    assert evaluation.oks_sigmas((0.3, 0.4), (0.1, 0.2), 2) == (0.3, 0.4)
    with pytest.raises(ValueError, match="needs 13 OKS sigmas"):
        evaluation.oks_sigmas((), None, 13)


def test_the_headline_names_the_ap_of_every_iou_type_the_model_was_scored_on():
    box_and_keypoints = {"bbox_AP": 0.62254, "bbox_AP50": 0.9, "keypoints_AP": 0.59081, "keypoints_AR": 0.7}
    assert evaluation.headline(box_and_keypoints) == "box AP 0.6225, keypoint AP 0.5908"
    all_three = dict(box_and_keypoints, segm_AP=0.544)
    assert evaluation.headline(all_three) == "box AP 0.6225, mask AP 0.5440, keypoint AP 0.5908"


# ----------------------------------------------------------------------------------------------------
# The evaluator's host side: worker processes, compact results.


def fake_batches(coco, rng, batch_size=4, slots=12):
    """Eval batches of `coco`'s images (the last one padded) and predict's outputs for each: random boxes on a
    canvas of 0.6 times each image, random mask probabilities, some invalid slots."""
    images = [coco.imgs[i] for i in coco.getImgIds()]
    batches, outputs = [], {}
    for start in range(0, len(images), batch_size):
        rows = images[start:start + batch_size]
        padding = batch_size - len(rows)
        original = np.asarray([(r["height"], r["width"]) for r in rows] + [(1, 1)] * padding, np.int32)
        image_size = np.round(original * 0.6).astype(np.int32)
        batch = {"image": np.zeros((batch_size, 1, 1, 3), np.float32), "image_size": image_size,
                 "original_size": original, "image_id": np.asarray([r["id"] for r in rows] + [-1] * padding),
                 "example_valid": np.asarray([True] * len(rows) + [False] * padding)}
        corners = rng.uniform(0, 1, (batch_size, slots, 2, 2)) * image_size[:, None, None, ::-1]
        outputs[start] = {
            "boxes": np.concatenate([corners.min(2), corners.max(2)], -1).astype(np.float32),
            "scores": rng.uniform(size=(batch_size, slots)).astype(np.float32),
            "classes": rng.integers(1, 4, (batch_size, slots)).astype(np.int32),
            "masks": rng.uniform(size=(batch_size, slots, 28, 28)).astype(np.float32),
            "valid": rng.uniform(size=(batch_size, slots)) < 0.8}
        for row, image in enumerate(rows):  # some detections on the ground truth, so that AP is not 0
            for slot, annotation in enumerate(coco.imgToAnns[image["id"]][:slots // 2]):
                x, y, w, h = annotation["bbox"]
                outputs[start]["boxes"][row, slot] = np.asarray([x, y, x + w, y + h]) * 0.6
                outputs[start]["classes"][row, slot] = CATEGORY_IDS.index(annotation["category_id"]) + 1
                outputs[start]["masks"][row, slot] = 1.0
                outputs[start]["valid"][row, slot] = True
        batch["first"] = np.full(batch_size, start)
        batches.append(batch)
    return batches, outputs


def fake_evaluator(coco, tmp_path, name, batches, host_workers):
    import json

    from maskrcnn_jax.evaluation.evaluator import CocoEvaluator

    class Evaluator(CocoEvaluator):
        def local_batches(self):
            return iter(batches)

    gt_path = tmp_path / "gt.json"
    if not gt_path.exists():
        gt_path.write_text(json.dumps(coco.dataset))
    config = config_lib.base_config()
    config.eval.host_workers = host_workers
    config.eval.batch_size = len(batches[0]["image_id"])
    return Evaluator(config, None, {"val_json": str(gt_path)}, CATEGORIES, str(tmp_path / name))


def test_host_workers_give_the_in_process_results_and_end_with_the_evaluation(rng, tmp_path):
    """eval.host_workers=2 and 0 write the same results JSON and metrics; the results are coco_result's for each
    image's detections (serving.host.image_results, RLE read off the crops), in image order; padding rows give
    nothing; and no worker process outlives evaluate()."""
    import json

    import psutil

    coco = make_ground_truth(rng, num_images=7)
    batches, outputs = fake_batches(coco, rng)
    by_first = {int(b["first"][0]): outputs[int(b["first"][0])] for b in batches}

    def predict(inputs):
        (first,) = [k for k, b in zip(by_first, batches) if b["image"] is inputs["image"]]
        return by_first[first]

    spec = spec_from_config(config_lib.base_config(), CATEGORIES, batch_size=1)
    expected = []
    for batch in batches:
        for row in np.flatnonzero(batch["example_valid"]):
            prepared = host.PreparedImage(None, tuple(batch["image_size"][row]), tuple(batch["original_size"][row]))
            detections = host.image_results({k: v[row] for k, v in outputs[int(batch["first"][0])].items()},
                                            prepared, spec, score_threshold=-np.inf, mask_crops=True)
            rles = evaluation.encode_mask_crops(detections["mask_crops"], *prepared.original_size)
            expected += [evaluation.coco_result(batch["image_id"][row], c, b, s, r) for b, s, c, r in
                         zip(detections["boxes"], detections["scores"], detections["labels"], rles)]
    assert len(expected) > 20
    written, metrics = {}, {}
    for workers in (2, 0):
        evaluator = fake_evaluator(coco, tmp_path, f"workers_{workers}", batches, workers)
        metrics[workers] = evaluator.evaluate(predict, step=3)
        path = tmp_path / f"workers_{workers}" / "eval" / "step_00000003_results.json"
        written[workers] = path.read_text()
        assert not [p for p in psutil.Process().children(recursive=True) if "host_worker" in " ".join(p.cmdline())]
    assert written[2] == written[0]
    assert json.loads(written[0]) == expected
    assert metrics[2] == metrics[0] and metrics[0]["segm_AP"] > 0


def test_a_host_worker_error_is_raised_in_the_evaluating_process(tmp_path):
    """A worker's exception comes back as an error naming it, a worker that dies is an error too (no hang), and
    either way the pool's processes end; eval.host_workers must be None or at least 0."""
    from maskrcnn_jax.evaluation import host_pool

    spec = spec_from_config(config_lib.base_config(), CATEGORIES, batch_size=1)
    broken = {"boxes": np.zeros((1, 2, 4), np.float32), "scores": np.zeros((1, 2), np.float32),
              "classes": np.ones((1, 2), np.int32)}  # no "valid"
    with pytest.raises(host_pool.WorkerError, match="KeyError: 'valid'"):
        with host_pool.HostPool(2, spec) as pool:
            processes = pool.processes
            pool.submit(broken, [1], [(10, 10)], [(20, 20)])
            pool.results(False, None)
    assert len(processes) == 2 and all(p.poll() is not None for p in processes) and not pool.processes
    with pytest.raises(host_pool.WorkerError, match="stopped answering"):
        with host_pool.HostPool(1, spec) as pool:
            processes = pool.processes
            processes[0].kill()
            pool.submit(dict(broken, valid=np.ones((1, 2), bool)), [1], [(10, 10)], [(20, 20)])
            pool.results(False, None)
    assert all(p.poll() is not None for p in processes)
    config = config_lib.base_config()
    config.eval.host_workers = -1
    with pytest.raises(ValueError, match="host_workers"):
        config_lib.validate(config)
    assert host_pool.resolve_workers(None) == min(host_pool.available_cores(), host_pool.MAX_AUTO_WORKERS)


HOST_POOL_SCRIPT = '''
import os
import sys

with open(os.environ["MARKER"], "a") as f:  # a worker that imported this script again would add a line
    f.write("imported as " + __name__ + "\\n")

import numpy as np

from maskrcnn_jax.evaluation import host_pool, result_arrays
from maskrcnn_jax.serving import host

if __name__ == "__main__":
    with open(os.environ["SPEC"]) as f:
        spec = host.InferenceSpec.from_json(f.read())
    with host_pool.HostPool(2, spec) as pool:
        for image_id in (1, 2, 3):
            pool.submit({"boxes": np.asarray([[[1, 1, 6, 6]]], np.float32), "scores": np.ones((1, 1), np.float32),
                         "classes": np.ones((1, 1), np.int32), "valid": np.ones((1, 1), bool),
                         "masks": np.ones((1, 1, 28, 28), np.float32)}, [image_id], [(8, 8)], [(16, 16)])
        results = result_arrays.to_results(pool.results(True, None))
    print("images", [r["image_id"] for r in results])
    print("heavy", sorted(m for m in ("jax", "tensorflow", "flax") if m in sys.modules))
'''


def test_host_workers_do_not_import_the_main_module_again(tmp_path):
    """A script that evaluates through the pool runs its top level once: the workers do not re-import the main
    module (as multiprocessing's spawn and forkserver both do). The pool and its workers' module import no JAX or
    TensorFlow."""
    import os
    import subprocess
    import sys

    script = tmp_path / "evaluate_with_pool.py"
    script.write_text(HOST_POOL_SCRIPT)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec_from_config(config_lib.base_config(), CATEGORIES, batch_size=1).to_json())
    marker = tmp_path / "marker.txt"
    env = dict(os.environ, MARKER=str(marker), SPEC=str(spec_path))
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "images [1, 2, 3]" in done.stdout and "heavy []" in done.stdout
    assert marker.read_text() == "imported as __main__\n"
