"""The generated stick-figure keypoint dataset: a real COCO keypoints file that pycocotools reads and scores."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_jax.data import keypoints, stick_figures


@pytest.fixture(scope="module")
def figures_folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("figures"))
    paths = stick_figures.generate(root, num_train=40, num_val=3, seed=0)
    with open(paths["train_json"]) as f:
        return root, paths, json.load(f)


def _quiet(function, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


def _keypoint_ap(gt_path, results):
    coco_gt = _quiet(COCO, gt_path)
    coco_dt = _quiet(coco_gt.loadRes, results)
    evaluator = COCOeval(coco_gt, coco_dt, iouType="keypoints")
    evaluator.params.kpt_oks_sigmas = np.asarray(stick_figures.OKS_SIGMAS)
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    return evaluator.stats[0]


def test_category_is_a_coco_keypoint_category(figures_folder):
    _, _, coco = figures_folder
    (category,) = coco["categories"]
    assert category["keypoints"] == list(stick_figures.JOINT_NAMES)
    assert category["kpt_oks_sigmas"] == list(stick_figures.OKS_SIGMAS)
    names = stick_figures.JOINT_NAMES
    assert [(names[a - 1], names[b - 1]) for a, b in category["skeleton"]] == list(stick_figures.SKELETON)
    assert 7 <= len(names) <= 13
    # Every left_ joint has its right_ partner, so the pipeline can derive the flip swap from the names.
    permutation = keypoints.flip_permutation(names)
    assert sorted(permutation) == list(range(len(names))) and permutation != tuple(range(len(names)))


def test_pycocotools_scores_the_ground_truth_as_perfect_results(figures_folder):
    _, paths, coco = figures_folder
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "keypoints": a["keypoints"], "score": 1.0}
               for a in coco["annotations"] if not a["iscrowd"]]
    assert _keypoint_ap(paths["train_json"], results) == pytest.approx(1.0)
    # The sigmas matter: moving every keypoint by 4 px costs AP.
    moved = [dict(r, keypoints=[v + 4.0 if i % 3 < 2 else v for i, v in enumerate(r["keypoints"])]) for r in results]
    assert _keypoint_ap(paths["train_json"], moved) < 0.9


def _by_image(coco):
    by_image = {}
    for annotation in coco["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    return by_image


def test_masks_boxes_and_keypoints_agree(figures_folder):
    _, _, coco = figures_folder
    by_image = _by_image(coco)
    counts = {0: 0, 1: 0, 2: 0}
    for image in coco["images"]:
        h, w = image["height"], image["width"]
        annotations = by_image.get(image["id"], [])
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in annotations]
        for a, mask in zip(annotations, masks):
            assert isinstance(a["segmentation"]["counts"], str) and a["segmentation"]["size"] == [h, w]
            assert a["area"] == mask.sum() > 0
            rows, cols = np.nonzero(mask)
            assert a["bbox"] == [cols.min(), rows.min(), cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min()]
            points = np.asarray(a["keypoints"], np.float64).reshape(-1, 3)
            assert points.shape == (len(stick_figures.JOINT_NAMES), 3)
            assert a["num_keypoints"] == (points[:, 2] > 0).sum()
            if a["iscrowd"]:
                assert a["num_keypoints"] == 0 and not points.any()
                continue
            others = np.any([m for b, m in zip(annotations, masks) if b is not a], axis=0) if len(masks) > 1 \
                else np.zeros_like(mask)
            for x, y, v in points:
                counts[int(v)] += 1
                if v == 0:
                    assert x == y == 0
                    continue
                assert 0 <= x < w and 0 <= y < h
                # Visible joints lie on the figure's own pixels; hidden ones under another figure.
                assert mask[int(y), int(x)] == (v == 2)
                if v == 1:
                    assert others[int(y), int(x)]
            # Big enough for a small model: the labelled joints span tens of pixels.
            labelled = points[points[:, 2] > 0, :2]
            assert np.ptp(labelled, axis=0).max() >= 25
    assert counts[1] > 0 and counts[2] > 10 * counts[1]  # occlusion happens, but most joints are visible


def test_crowds_empty_images_and_several_figures_are_present(figures_folder):
    _, _, coco = figures_folder
    by_image = _by_image(coco)
    assert sum(1 for image in coco["images"] if image["id"] not in by_image) >= 1
    crowds = [a for a in coco["annotations"] if a["iscrowd"]]
    assert crowds and all(isinstance(a["segmentation"], dict) for a in crowds)
    assert max(sum(1 for a in annotations if not a["iscrowd"]) for annotations in by_image.values()) >= 3
    for image in coco["images"]:
        assert 256 <= image["height"] <= 320 and 256 <= image["width"] <= 320


def test_generation_is_deterministic_and_seeded(tmp_path):
    options = stick_figures.StickFigureOptions(image_size_range=(64, 80), figure_height_range=(30.0, 50.0))
    first = stick_figures.generate(str(tmp_path / "a"), num_train=3, num_val=1, seed=7, options=options)
    second = stick_figures.generate(str(tmp_path / "b"), num_train=3, num_val=1, seed=7, options=options)
    third = stick_figures.generate(str(tmp_path / "c"), num_train=3, num_val=1, seed=8, options=options)

    def read(paths):
        with open(paths["train_json"]) as f:
            coco = json.load(f)
        pixels = [open(os.path.join(paths["train_images"], i["file_name"]), "rb").read() for i in coco["images"]]
        return coco["annotations"], pixels

    assert read(first) == read(second)
    assert read(first) != read(third)
    stamp = os.path.getmtime(first["train_json"])
    stick_figures.generate(str(tmp_path / "a"), num_train=3, num_val=1, seed=7, options=options)
    assert os.path.getmtime(first["train_json"]) == stamp  # the same arguments keep the folder as it is
