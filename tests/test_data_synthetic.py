"""The synthetic shapes dataset and the polygon geometry behind its occlusion."""

import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskrcnn_jax.data import polygons, synthetic


def _random_convex(rng, centre, radius, n):
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.6, 1.0, n)
    return centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _rasterize(pieces, size):
    if not pieces:
        return np.zeros((size, size), np.uint8)
    return mask_utils.decode(mask_utils.merge(
        mask_utils.frPyObjects([p.reshape(-1).tolist() for p in pieces], size, size)))


@pytest.mark.parametrize("subject_kind", ["convex", "star", "cross"])
def test_subtract_shape_is_exact(rng, subject_kind):
    for _ in range(20):
        if subject_kind == "convex":
            subject = _random_convex(rng, rng.uniform(30, 50, 2), 25, 9)
        else:
            outline, _ = synthetic.make_shape(subject_kind, 25.0, rng.uniform(0, 2 * np.pi))
            subject = outline + rng.uniform(30, 50, 2)
        occluder_outline, occluder_parts = synthetic.make_shape(
            synthetic.CLASS_NAMES[rng.integers(5)], rng.uniform(5, 30), rng.uniform(0, 2 * np.pi))
        shift = rng.uniform(20, 60, 2)
        occluder_outline, occluder_parts = occluder_outline + shift, [p + shift for p in occluder_parts]

        pieces = polygons.subtract_shape([subject], occluder_parts)
        assert sum(polygons.polygon_area(p) for p in pieces) <= polygons.polygon_area(subject) + 1e-6
        # Pixels: the visible part is the subject minus the occluder, up to boundary pixels.
        expected = _rasterize([subject], 80).astype(bool) & ~_rasterize([occluder_outline], 80).astype(bool)
        got = _rasterize(pieces, 80).astype(bool)
        mismatch = np.logical_xor(expected, got).sum()
        assert mismatch <= 0.05 * max(expected.sum(), 1) + 6, (mismatch, expected.sum())


def test_subtract_convex_area_identity(rng):
    for _ in range(50):
        subject = _random_convex(rng, rng.uniform(40, 60, 2), 30, 12)
        convex = _random_convex(rng, rng.uniform(30, 70, 2), 20, 7)
        inside = polygons.clip_to_convex(subject, convex)
        outside = polygons.subtract_convex([subject], convex)
        total = polygons.polygon_area(inside) + sum(polygons.polygon_area(p) for p in outside)
        np.testing.assert_allclose(total, polygons.polygon_area(subject), rtol=1e-9)


def test_shape_parts_cover_the_outline(rng):
    for name in synthetic.CLASS_NAMES:
        outline, parts = synthetic.make_shape(name, 20.0, rng.uniform(0, 2 * np.pi))
        # Subtracting a shape's parts from its own outline leaves nothing.
        assert sum(polygons.polygon_area(p) for p in polygons.subtract_shape([outline], parts)) < 1e-6


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    paths = synthetic.generate(root, num_train=40, num_val=4, seed=0)
    with open(paths["train_json"]) as f:
        return root, paths, json.load(f)


def test_generate_writes_a_coco_folder(shapes_folder):
    root, paths, coco = shapes_folder
    assert paths == synthetic.shapes_data_paths(root)
    assert [c["name"] for c in coco["categories"]] == list(synthetic.CLASS_NAMES)
    assert len(coco["images"]) == 40
    for image in coco["images"]:
        assert os.path.isfile(os.path.join(paths["train_images"], image["file_name"]))
        assert 256 <= image["height"] <= 320 and 256 <= image["width"] <= 320
    with open(paths["val_json"]) as f:
        assert len(json.load(f)["images"]) == 4


def test_dataset_has_every_class_empty_images_and_occlusion(shapes_folder):
    _, _, coco = shapes_folder
    by_image = {}
    for annotation in coco["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3, 4, 5}
    assert sum(1 for image in coco["images"] if image["id"] not in by_image) >= 1  # some empty images
    overlapping_boxes = 0
    for image in coco["images"]:
        annotations = by_image.get(image["id"], [])
        h, w = image["height"], image["width"]
        masks = []
        for a in annotations:
            assert a["iscrowd"] == 0 and all(len(p) >= 6 for p in a["segmentation"])
            mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w)))
            assert a["area"] == mask.sum() >= 50
            x, y, bw, bh = a["bbox"]
            assert 0 <= x and 0 <= y and x + bw <= w + 1e-6 and y + bh <= h + 1e-6
            rows, cols = np.nonzero(mask)
            assert x - 1 <= cols.min() and cols.max() <= x + bw and y - 1 <= rows.min() and rows.max() <= y + bh
            masks.append(mask.astype(bool))
        for i in range(len(annotations)):
            for j in range(i + 1, len(annotations)):
                # Visible parts never overlap (only boundary pixels may be shared by rasterisation)...
                assert (masks[i] & masks[j]).sum() <= 0.05 * min(masks[i].sum(), masks[j].sum()) + 4
                a, b = annotations[i]["bbox"], annotations[j]["bbox"]
                if a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]:
                    overlapping_boxes += 1
    assert overlapping_boxes >= 3  # ...although shapes do overlap: occlusion is there and handled


def test_generation_is_deterministic_and_seeded(tmp_path):
    options = synthetic.ShapesOptions(image_size_range=(64, 80), object_size_range=(12.0, 30.0),
                                      min_visible_area=30.0)
    first = synthetic.generate(str(tmp_path / "a"), num_train=3, num_val=1, seed=7, options=options)
    second = synthetic.generate(str(tmp_path / "b"), num_train=3, num_val=1, seed=7, options=options)
    third = synthetic.generate(str(tmp_path / "c"), num_train=3, num_val=1, seed=8, options=options)

    def read(paths):
        with open(paths["train_json"]) as f:
            coco = json.load(f)
        pixels = [open(os.path.join(paths["train_images"], i["file_name"]), "rb").read() for i in coco["images"]]
        return coco["annotations"], pixels

    assert read(first) == read(second)
    assert read(first) != read(third)
    # A second call with the same arguments keeps the folder as it is.
    stamp = os.path.getmtime(first["train_json"])
    synthetic.generate(str(tmp_path / "a"), num_train=3, num_val=1, seed=7, options=options)
    assert os.path.getmtime(first["train_json"]) == stamp
