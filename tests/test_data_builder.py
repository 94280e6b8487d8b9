"""The COCO-format TFDS builder on a hand-written dataset with every case it must handle."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

tfds = pytest.importorskip("tensorflow_datasets")

from maskrcnn_jax.data import coco_dataset  # noqa: E402
from maskrcnn_jax.data import coco_format  # noqa: E402

CATEGORIES = [{"id": 12, "name": "kite"}, {"id": 3, "name": "car"}, {"id": 7, "name": "dog"}]  # unsorted, gaps
LABEL_OF = {3: 1, 7: 2, 12: 3}


def _polygon_box(polygon):
    xs, ys = polygon[0::2], polygon[1::2]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _uncompressed_rle(mask):
    """COCO's uncompressed RLE: run lengths over the column-major flattening, starting with zeros."""
    flat = np.asarray(mask, np.uint8).reshape(-1, order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": list(mask.shape)}


class _Writer:
    """Collects images and annotations of a COCO-format dataset under a folder."""

    def __init__(self, root):
        self.images_dir = os.path.join(root, "images")
        os.makedirs(self.images_dir, exist_ok=True)
        self.root = root
        self.images, self.annotations = [], []

    def image(self, file_name, height, width, save=None):
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        if save is not None:
            save(os.path.join(self.images_dir, file_name))
        return image_id

    def annotate(self, image_id, category_id, segmentation, bbox, iscrowd=0, area=None, **extra):
        annotation = {"id": 100 + len(self.annotations), "image_id": image_id, "category_id": category_id,
                      "segmentation": segmentation, "bbox": bbox, "iscrowd": iscrowd, **extra}
        if area is not None:
            annotation["area"] = area
        self.annotations.append(annotation)
        return annotation["id"]

    def write(self, name="instances.json", categories=CATEGORIES):
        path = os.path.join(self.root, name)
        with open(path, "w") as f:
            json.dump({"images": self.images, "annotations": self.annotations, "categories": categories}, f)
        return path


def _save_array(array, **kwargs):
    def save(path):
        Image.fromarray(array).save(path, **kwargs)
    return save


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Writes the dataset, builds it once, and returns (builder, examples by image id, expectations)."""
    root = str(tmp_path_factory.mktemp("coco_case"))
    rng = np.random.default_rng(1234)
    w = _Writer(root)
    expect = {}

    # 1. An RGB JPEG with two polygon instances, one in two parts, and a non-crowd with explicit area.
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    i = w.image("rgb.jpg", 48, 64, _save_array(rgb, quality=95))
    square = [4.0, 4.0, 20.0, 4.0, 20.0, 20.0, 4.0, 20.0]
    two_parts = [[30.0, 10.0, 40.0, 10.0, 40.0, 30.0], [50.0, 30.0, 60.0, 30.0, 60.0, 44.0, 50.0, 44.0]]
    w.annotate(i, 3, [square], _polygon_box(square), area=256.0)
    w.annotate(i, 12, two_parts, [30.0, 10.0, 30.0, 34.0])
    decoded_jpeg = np.asarray(Image.open(os.path.join(w.images_dir, "rgb.jpg")).convert("RGB"))
    expect["rgb"] = dict(id=i, pixels=decoded_jpeg, path=os.path.join(w.images_dir, "rgb.jpg"), labels=[1, 3], crowd=[False, False],
                         masks=[[square], two_parts], boxes=[[4, 4, 20, 20], [30, 10, 60, 44]])

    # 2. An RGB PNG with a compressed-RLE instance and an uncompressed-RLE crowd region (listed first).
    png = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    i = w.image("rle.png", 40, 50, _save_array(png))
    crowd_mask = np.zeros((40, 50), np.uint8)
    crowd_mask[20:38, 5:45] = 1
    object_mask = np.zeros((40, 50), np.uint8)
    object_mask[3:15, 10:30] = 1
    object_mask[5:8, 12:14] = 0
    compressed = mask_utils.encode(np.asfortranarray(object_mask))
    compressed["counts"] = compressed["counts"].decode()
    w.annotate(i, 7, _uncompressed_rle(crowd_mask), [5, 20, 40, 18], iscrowd=1)
    w.annotate(i, 3, compressed, [10, 3, 20, 12])
    expect["rle"] = dict(id=i, pixels=png, labels=[1, 2], crowd=[False, True],
                         mask_arrays=[object_mask, crowd_mask], boxes=[[10, 3, 30, 15], [5, 20, 45, 38]])

    # 3. An image without annotations.
    blank = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    expect["empty"] = dict(id=w.image("empty.png", 30, 30, _save_array(blank)), pixels=blank)

    # 4. Grayscale, RGBA and 16-bit PNGs, each with one instance.
    gray = rng.integers(0, 256, (32, 36), dtype=np.uint8)
    i = w.image("gray.png", 32, 36, _save_array(gray))
    w.annotate(i, 12, [square], _polygon_box(square))
    expect["gray"] = dict(id=i, pixels=np.repeat(gray[..., None], 3, axis=2))
    rgba = rng.integers(0, 256, (32, 36, 4), dtype=np.uint8)
    i = w.image("rgba.png", 32, 36, _save_array(rgba))
    w.annotate(i, 7, [square], _polygon_box(square))
    expect["rgba"] = dict(id=i, pixels=rgba[..., :3])
    deep = rng.integers(0, 65536, (32, 36), dtype=np.uint16)
    i = w.image("deep.png", 32, 36, _save_array(deep))
    w.annotate(i, 3, [square], _polygon_box(square))
    expect["deep"] = dict(id=i, pixels=np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, axis=2))

    # 5. A JPEG stored sideways with EXIF orientation 6 (display = stored rotated 90° clockwise). The JSON
    #    gives the upright size, and the annotation is in upright coordinates.
    upright = np.zeros((40, 64, 3), np.uint8)
    upright[:, :32] = (230, 20, 20)
    upright[:, 32:] = (20, 20, 230)
    upright[:8] = (20, 230, 20)
    exif = Image.Exif()
    exif[0x0112] = 6

    def save_rotated(path):
        Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1))).save(path, quality=95, exif=exif.tobytes())

    i = w.image("exif.jpg", 40, 64, save_rotated)
    top_band = [0.0, 0.0, 64.0, 0.0, 64.0, 8.0, 0.0, 8.0]
    w.annotate(i, 7, [top_band], _polygon_box(top_band))
    expect["exif"] = dict(id=i, pixels=upright)

    # 6. Images that must be skipped: a truncated JPEG, a missing file, a size that contradicts the JSON.
    def save_truncated(path):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        with open(path, "wb") as f:
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    w.annotate(w.image("truncated.jpg", 64, 64, save_truncated), 3, [square], _polygon_box(square))
    w.annotate(w.image("missing.jpg", 64, 64), 3, [square], _polygon_box(square))
    w.image("wrong_size.png", 50, 50, _save_array(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)))

    # 7. Annotations that must be skipped, on an otherwise good image.
    good = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    i = w.image("bad_annotations.png", 30, 40, _save_array(good))
    w.annotate(i, 3, [square], [4.0, 4.0, 0.0, 16.0])  # zero-width box
    w.annotate(i, 3, [[2.0, 2.0, 2.0, 2.5, 2.0, 3.0]], [2.0, 2.0, 1.0, 1.0])  # collinear: covers no pixel
    w.annotate(i, 3, [[1.0, 1.0, 5.0, 5.0]], [1.0, 1.0, 4.0, 4.0])  # two points are no polygon
    w.annotate(i, 3, [], [1.0, 1.0, 4.0, 4.0])  # no segmentation
    w.annotate(i, 12, [square], _polygon_box(square))
    expect["bad_annotations"] = dict(id=i, pixels=good, labels=[3])

    json_path = w.write()
    data_config = {"name": "cases", "data_dir": os.path.join(root, "tfds"), "train_json": json_path,
                   "train_images": w.images_dir}
    builder = coco_dataset.build(data_config)
    examples = {int(e["image_id"]): e for e in tfds.as_numpy(builder.as_dataset(split="train"))}
    raw = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    for e in tfds.as_numpy(raw):
        examples[int(e["image_id"])]["image_bytes"] = e["image"]
    return builder, examples, expect, data_config


def test_category_map_is_contiguous_and_stored(built):
    builder, _, _, data_config = built
    categories = coco_dataset.load_category_map(builder)
    assert categories.category_ids == (3, 7, 12)
    assert categories.names == ("car", "dog", "kite")
    assert [categories.label(c) for c in (3, 7, 12)] == [1, 2, 3]
    assert [categories.category_id(label) for label in (1, 2, 3)] == [3, 7, 12]
    assert categories.name(0) == "background"
    assert categories.label_to_category_id_array().tolist() == [-1, 3, 7, 12]
    with pytest.raises(KeyError):
        categories.label(4)
    # A fresh builder on the built directory (no annotation paths) reads the same map from disk.
    reloaded = coco_dataset.get_builder({"name": "cases", "data_dir": data_config["data_dir"]})
    assert reloaded.is_prepared()
    assert coco_dataset.load_category_map(reloaded) == categories


def test_summary_counts_everything(built):
    builder, examples, _, _ = built
    summary = coco_dataset.build_summary(builder)["train"]
    assert summary["images_in_json"] == 11
    assert summary["images"] == 8 == len(examples)
    assert summary["empty_images"] == 1
    assert summary["crowd_regions"] == 1
    assert summary["instances"] == 2 + 1 + 1 + 1 + 1 + 1 + 1  # rgb, rle, gray, rgba, deep, exif, bad_annotations
    assert summary["skipped_images"] == {"unreadable_image": 1, "missing_image": 1, "size_mismatch": 1}
    assert summary["skipped_annotations"] == {"degenerate_box": 1, "zero_area_mask": 1,
                                              "invalid_segmentation": 1, "missing_segmentation": 1}
    assert summary["reencoded_images"] == 4  # gray, rgba, 16-bit, exif
    text = coco_dataset.format_summary({"train": summary})
    assert "8 images written of 11" in text and "1 unreadable_image" in text and "1 degenerate_box" in text


def test_skipped_items_are_logged_by_file(tmp_path, caplog):
    writer = _Writer(str(tmp_path))
    writer.image("gone.jpg", 10, 10)
    writer.image("ok.png", 10, 10, _save_array(np.full((10, 10, 3), 7, np.uint8)))
    json_path = writer.write()
    with caplog.at_level("WARNING"):
        coco_dataset.build({"name": "logged", "data_dir": str(tmp_path / "tfds"), "train_json": json_path,
                           "train_images": writer.images_dir})
    assert any("gone.jpg" in record.getMessage() and "missing_image" in record.getMessage()
               for record in caplog.records)


def _mask_of(polygons, height, width):
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))


def test_polygon_instances(built):
    _, examples, expect, _ = built
    case = expect["rgb"]
    example = examples[case["id"]]
    image = example["image"]
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    # The JPEG's own bytes are kept, not re-encoded.
    with open(case["path"], "rb") as f:
        assert example["image_bytes"] == f.read()
    # TensorFlow and PIL upsample chroma differently, hence the tolerance.
    assert np.abs(image.astype(int) - case["pixels"].astype(int)).mean() < 2
    objects = example["objects"]
    assert objects["label"].tolist() == case["labels"]
    assert objects["category_id"].tolist() == [3, 12]
    assert objects["is_crowd"].tolist() == case["crowd"]
    np.testing.assert_allclose(objects["box"], np.asarray(case["boxes"], np.float32))
    assert objects["area"][0] == 256.0  # the annotation's own area
    assert objects["area"][1] == _mask_of(case["masks"][1], 48, 64).sum()  # the mask's, when none is given
    assert objects["mask"].shape == (2, 48, 64, 1)
    for stored, polygons in zip(objects["mask"], case["masks"]):
        np.testing.assert_array_equal(stored[..., 0], _mask_of(polygons, 48, 64))


def test_rle_instances_and_crowd_last(built):
    _, examples, expect, _ = built
    case = expect["rle"]
    example = examples[case["id"]]
    np.testing.assert_array_equal(example["image"], case["pixels"])  # lossless PNG kept as is
    objects = example["objects"]
    assert objects["label"].tolist() == case["labels"]
    assert objects["is_crowd"].tolist() == case["crowd"]
    np.testing.assert_allclose(objects["box"], np.asarray(case["boxes"], np.float32))
    for stored, expected in zip(objects["mask"], case["mask_arrays"]):
        np.testing.assert_array_equal(stored[..., 0], expected)


def test_empty_image_is_kept(built):
    _, examples, expect, _ = built
    example = examples[expect["empty"]["id"]]
    np.testing.assert_array_equal(example["image"], expect["empty"]["pixels"])
    assert example["objects"]["label"].shape == (0,)
    assert example["objects"]["box"].shape == (0, 4)
    assert example["objects"]["mask"].shape[0] == 0


@pytest.mark.parametrize("case", ["gray", "rgba", "deep"])
def test_channel_counts_and_bit_depths_become_rgb8(built, case):
    _, examples, expect, _ = built
    example = examples[expect[case]["id"]]
    np.testing.assert_array_equal(example["image"], expect[case]["pixels"])
    assert example["objects"]["label"].shape == (1,)


def test_exif_rotated_jpeg_is_stored_upright(built):
    _, examples, expect, _ = built
    example = examples[expect["exif"]["id"]]
    assert (int(example["height"]), int(example["width"])) == (40, 64)
    assert example["image"].shape == (40, 64, 3)
    error = np.abs(example["image"].astype(int) - expect["exif"]["pixels"].astype(int))
    # JPEG rings at the colour edges; block interiors must match, which they would not if rotated.
    assert error.mean() < 6
    assert error[12:, 4:28].max() < 40 and error[12:, 36:].max() < 40 and error[:4].max() < 40
    np.testing.assert_allclose(example["objects"]["box"], [[0, 0, 64, 8]])


def test_bad_annotations_are_dropped_and_the_rest_kept(built):
    _, examples, expect, _ = built
    example = examples[expect["bad_annotations"]["id"]]
    assert example["objects"]["label"].tolist() == expect["bad_annotations"]["labels"]


def test_skipped_images_are_absent(built):
    _, examples, _, _ = built
    names = {e["file_name"].decode() for e in examples.values()}
    assert not names & {"truncated.jpg", "missing.jpg", "wrong_size.png"}


def test_unknown_category_is_a_clear_error(tmp_path):
    writer = _Writer(str(tmp_path))
    image_id = writer.image("a.png", 10, 10, _save_array(np.zeros((10, 10, 3), np.uint8)))
    writer.annotate(image_id, 99, [[1.0, 1.0, 5.0, 1.0, 5.0, 5.0]], [1, 1, 4, 4])
    json_path = writer.write()
    with pytest.raises(coco_format.CocoFormatError, match="category_id 99.*missing from the category list"):
        coco_dataset.build({"name": "bad_category", "data_dir": str(tmp_path / "tfds"), "train_json": json_path,
                           "train_images": writer.images_dir})


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "top level is not an object"),
    (json.dumps({"annotations": [], "categories": [{"id": 1, "name": "a"}]}), "missing key 'images'"),
    (json.dumps({"images": [], "annotations": [], "categories": []}), "category list is empty"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}],
                 "annotations": [], "categories": [{"id": 1, "name": "a"}]}), "duplicate image id 1"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                 "annotations": [{"id": 5, "image_id": 2, "category_id": 1}],
                 "categories": [{"id": 1, "name": "a"}]}), "annotation 5 refers to image id 2"),
])
def test_invalid_coco_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "instances.json"
    path.write_text(content)
    with pytest.raises(coco_format.CocoFormatError, match=message):
        coco_format.load_coco_annotations(path)


def test_every_image_unreadable_is_an_error(tmp_path):
    writer = _Writer(str(tmp_path))
    for name in ("a.jpg", "b.jpg"):
        def save_garbage(path):
            with open(path, "wb") as f:
                f.write(b"this is not an image")
        writer.image(name, 10, 10, save_garbage)
    json_path = writer.write()
    with pytest.raises(coco_dataset.DatasetBuildError, match="not one image"):
        coco_dataset.build({"name": "unreadable", "data_dir": str(tmp_path / "tfds"), "train_json": json_path,
                           "train_images": writer.images_dir})
    assert not coco_dataset.get_builder({"name": "unreadable", "data_dir": str(tmp_path / "tfds")}).is_prepared()


def test_splits_must_share_categories(tmp_path):
    writer = _Writer(str(tmp_path))
    writer.image("a.png", 10, 10, _save_array(np.zeros((10, 10, 3), np.uint8)))
    train_json = writer.write("train.json")
    val_json = writer.write("val.json", categories=[{"id": 1, "name": "other"}])
    with pytest.raises(coco_format.CocoFormatError, match="categories of validation"):
        coco_dataset.build({"name": "mismatch", "data_dir": str(tmp_path / "tfds"), "train_json": train_json,
                           "train_images": writer.images_dir, "val_json": val_json,
                           "val_images": writer.images_dir})


def test_a_dataset_without_keypoints_has_no_keypoint_schema(built):
    builder, examples, expect, _ = built
    assert coco_dataset.load_keypoint_schema(builder) is None
    assert builder.info.metadata["keypoints"] is None
    summary = coco_dataset.build_summary(builder)["train"]
    assert summary["keypoint_instances"] == summary["labelled_keypoints"] == 0
    assert "keypoint" not in coco_dataset.format_summary({"train": summary})
    assert examples[expect["rgb"]["id"]]["objects"]["keypoints"].shape == (2, 0, 3)


# ----------------------------------------------------------------------------------------------------
# Keypoints.

KEYPOINT_NAMES = ["nose", "left_eye", "right_eye", "left_foot", "right_foot"]
KEYPOINT_SIGMAS = [0.026, 0.025, 0.025, 0.089, 0.089]
KEYPOINT_CATEGORIES = [{"id": 5, "name": "person", "keypoints": KEYPOINT_NAMES, "skeleton": [[1, 2], [1, 3], [4, 5]],
                        "kpt_oks_sigmas": KEYPOINT_SIGMAS},
                       {"id": 2, "name": "ball"}]
SQUARE = [4.0, 4.0, 20.0, 4.0, 20.0, 20.0, 4.0, 20.0]


def _flat(points):
    return [float(v) for point in points for v in point]


@pytest.fixture(scope="module")
def keypoint_build(tmp_path_factory):
    """A keypoint dataset with one annotation per way keypoints can be good or bad: (builder, objects, cases)."""
    root = str(tmp_path_factory.mktemp("keypoint_case"))
    w = _Writer(root)
    image_id = w.image("people.png", 40, 60, _save_array(np.zeros((40, 60, 3), np.uint8)))
    good = [(10, 5, 2), (12, 4.5, 2), (8, 4, 1), (0, 0, 0), (60, 40, 2)]  # the far corner is inside
    cases = {  # name: (keypoints in the JSON, what is stored)
        "good": (_flat(good), good),
        "wrong_length": (_flat(good)[:6], [(0, 0, 0)] * 5),
        "bad_visibility": (_flat([(10, 5, 3)] + good[1:]), [(0, 0, 0)] * 5),
        "outside": (_flat([(60.5, 5, 2)] + good[1:]), [(0, 0, 0)] + good[1:]),
        "position_without_visibility": (_flat([(10, 5, 0)] + good[1:]), [(0, 0, 0)] + good[1:]),
    }
    ids = {}
    for name, (raw, _) in cases.items():
        ids[name] = w.annotate(image_id, 5, [SQUARE], _polygon_box(SQUARE), keypoints=raw,
                               num_keypoints=sum(v > 0 for v in raw[2::3]))
    ids["num_keypoints_mismatch"] = w.annotate(image_id, 5, [SQUARE], _polygon_box(SQUARE), keypoints=_flat(good),
                                               num_keypoints=2)
    cases["num_keypoints_mismatch"] = (None, good)
    ids["ball"] = w.annotate(image_id, 2, [SQUARE], _polygon_box(SQUARE))
    cases["ball"] = (None, [(0, 0, 0)] * 5)
    ids["crowd"] = w.annotate(image_id, 5, [SQUARE], _polygon_box(SQUARE), iscrowd=1, keypoints=[0] * 15,
                              num_keypoints=0)
    cases["crowd"] = (None, [(0, 0, 0)] * 5)
    w.image("nobody.png", 20, 20, _save_array(np.zeros((20, 20, 3), np.uint8)))
    json_path = w.write(categories=KEYPOINT_CATEGORIES)
    builder = coco_dataset.build({"name": "people", "data_dir": os.path.join(root, "tfds"), "train_json": json_path,
                                 "train_images": w.images_dir})
    example = next(e for e in tfds.as_numpy(builder.as_dataset(split="train")) if e["image_id"] == image_id)
    order = [name for name in ids if name != "crowd"] + ["crowd"]  # the builder puts crowd regions last
    return builder, example["objects"], {name: cases[name][1] for name in order}


def test_keypoint_schema_is_stored_with_the_dataset(keypoint_build):
    builder, _, _ = keypoint_build
    schema = coco_dataset.load_keypoint_schema(builder)
    assert schema.names == tuple(KEYPOINT_NAMES) and schema.num_keypoints == 5
    assert schema.skeleton == ((0, 1), (0, 2), (3, 4))  # 0-based past the JSON
    assert schema.oks_sigmas == pytest.approx(KEYPOINT_SIGMAS)
    assert schema.category_ids == (5,)
    reloaded = coco_dataset.get_builder({"name": "people", "data_dir": os.fspath(builder.data_dir_root)})
    assert reloaded.is_prepared()
    assert coco_dataset.load_keypoint_schema(reloaded) == schema


def test_keypoints_are_stored_per_object_and_bad_ones_counted(keypoint_build):
    builder, objects, expected = keypoint_build
    assert objects["keypoints"].shape == (len(expected), 5, 3) and objects["keypoints"].dtype == np.float32
    for stored, (name, points) in zip(objects["keypoints"], expected.items()):
        np.testing.assert_array_equal(stored, np.asarray(points, np.float32), err_msg=name)
    assert objects["num_keypoints"].tolist() == [sum(v > 0 for _, _, v in p) for p in expected.values()]
    assert objects["label"].shape == (len(expected),)  # instances with bad keypoints are kept
    summary = coco_dataset.build_summary(builder)["train"]
    assert summary["keypoint_corrections"] == {"invalid_keypoints": 1, "invalid_keypoint_visibility": 1,
                                               "keypoint_outside_image": 1, "position_without_visibility": 1,
                                               "num_keypoints_mismatch": 1}
    assert summary["keypoint_instances"] == 4  # good, outside, position_without_visibility, num_keypoints_mismatch
    assert summary["labelled_keypoints"] == 4 + 3 + 3 + 4
    text = coco_dataset.format_summary({"train": summary})
    assert "14 labelled on 4 instances" in text and "1 keypoint_outside_image" in text


def _keypoint_json(tmp_path, categories, annotation_keypoints=None, category_id=5):
    writer = _Writer(str(tmp_path))
    image_id = writer.image("a.png", 10, 10, _save_array(np.zeros((10, 10, 3), np.uint8)))
    extra = {} if annotation_keypoints is None else {"keypoints": annotation_keypoints}
    writer.annotate(image_id, category_id, [[1.0, 1.0, 5.0, 1.0, 5.0, 5.0]], [1, 1, 4, 4], **extra)
    return writer.write(categories=categories)


def _category(**changes):
    return [dict(KEYPOINT_CATEGORIES[0], **changes), KEYPOINT_CATEGORIES[1]]


@pytest.mark.parametrize("categories, keypoints, category_id, message", [
    (KEYPOINT_CATEGORIES, [1, 1, 2] + [0] * 12, 2, "category 2 names no keypoints"),
    (KEYPOINT_CATEGORIES + [{"id": 9, "name": "cat", "keypoints": ["nose", "tail"]}], None, 5,
     "name different keypoints"),
    (_category(skeleton=[[1, 6]]), None, 5, "'skeleton' must be pairs of 1-based keypoint indices in 1..5"),
    (_category(kpt_oks_sigmas=[0.1] * 4), None, 5, "oks_sigmas must be 5 positive numbers"),
    (_category(keypoints=["nose", "nose", "a", "b", "c"]), None, 5, "must be unique"),
])
def test_invalid_keypoint_files_are_clear_errors(tmp_path, categories, keypoints, category_id, message):
    path = _keypoint_json(tmp_path, categories, keypoints, category_id)
    with pytest.raises(coco_format.CocoFormatError, match=message):
        coco_format.load_coco_annotations(path)


def test_all_zero_keypoints_on_a_category_without_names_say_nothing(tmp_path):
    index = coco_format.load_coco_annotations(_keypoint_json(tmp_path, KEYPOINT_CATEGORIES, [0, 0, 0], 2))
    assert index.keypoints.names == tuple(KEYPOINT_NAMES)


def test_splits_must_share_keypoints(tmp_path):
    train_json = _keypoint_json(tmp_path / "train", KEYPOINT_CATEGORIES)
    val_json = _keypoint_json(tmp_path / "val", _category(keypoints=KEYPOINT_NAMES[::-1]))
    with pytest.raises(coco_format.CocoFormatError, match="keypoints of validation"):
        coco_dataset.build({"name": "keypoint_mismatch", "data_dir": str(tmp_path / "tfds"),
                           "train_json": train_json, "train_images": str(tmp_path / "train" / "images"),
                           "val_json": val_json, "val_images": str(tmp_path / "val" / "images")})


class _Version100(coco_dataset.CocoInstances, skip_registration=True):
    """The builder as it was before keypoints (same name, version 1.0.0), to write an old dataset."""

    VERSION = tfds.core.Version("1.0.0")
    SUPPORTED_VERSIONS = []
    name = "coco_instances"

    def _generate_examples(self, split, index, images_dir):
        for key, example in super()._generate_examples(split, index, images_dir):
            del example["objects"]["keypoints"], example["objects"]["num_keypoints"]
            yield key, example


def test_a_dataset_built_before_keypoint_support_is_still_read(tmp_path):
    writer = _Writer(str(tmp_path))
    image_id = writer.image("a.png", 20, 20, _save_array(np.full((20, 20, 3), 9, np.uint8)))
    writer.annotate(image_id, 3, [SQUARE], _polygon_box(SQUARE))
    config = {"name": "old", "data_dir": str(tmp_path / "tfds"), "train_json": writer.write(),
              "train_images": writer.images_dir}
    old = _Version100(config=coco_dataset.CocoInstancesConfig(
        name="old", train_json=config["train_json"], train_images=config["train_images"]), data_dir=config["data_dir"])
    old.download_and_prepare()
    assert "keypoints" not in old.info.features["objects"].feature.keys()

    builder = coco_dataset.build(config)  # finds the old version instead of building a new one
    assert str(builder.version) == "1.0.0" and builder.is_prepared()
    assert coco_dataset.load_keypoint_schema(builder) is None
    (example,) = tfds.as_numpy(builder.as_dataset(split="train"))
    assert example["objects"]["label"].tolist() == [1] and "keypoints" not in example["objects"]


# ----------------------------------------------------------------------------------------------------
# Source fingerprints: a built dataset is never silently stale.


@pytest.fixture
def fingerprinted(tmp_path):
    """A built one-image dataset: (data config, writer)."""
    writer = _Writer(str(tmp_path))
    image_id = writer.image("a.png", 24, 24, _save_array(np.full((24, 24, 3), 50, np.uint8)))
    writer.annotate(image_id, 12, [SQUARE], _polygon_box(SQUARE))
    config = {"name": "fingerprinted", "data_dir": str(tmp_path / "tfds"), "train_json": writer.write(),
              "train_images": writer.images_dir}
    builder = coco_dataset.build(config)
    sources = builder.info.metadata["sources"]["train"]
    assert sources["json_bytes"] == os.path.getsize(config["train_json"])
    assert (sources["image_files"], sources["image_bytes"]) == (1, os.path.getsize(
        os.path.join(writer.images_dir, "a.png")))
    return config, writer


def _rewrite(path, old, new, keep_mtime=False):
    stat = os.stat(path)
    with open(path) as f:
        text = f.read()
    assert old in text
    with open(path, "w") as f:
        f.write(text.replace(old, new))
    # A fixed, different modification time, so the test does not depend on the file system's clock resolution.
    mtime = stat.st_mtime_ns if keep_mtime else stat.st_mtime_ns + 5 * 10**9
    os.utime(path, ns=(mtime, mtime))


def test_a_changed_json_stops_with_what_changed_and_what_to_do(fingerprinted):
    config, _ = fingerprinted
    _rewrite(config["train_json"], '"kite"', '"kite with a longer name"')
    with pytest.raises(coco_dataset.StaleDatasetError) as error:
        coco_dataset.build(config)
    message = str(error.value)
    assert "train: JSON" in message and config["train_json"] in message and "bytes, was" in message
    assert "Delete" in message and "data.name" in message


def test_a_json_with_the_same_size_but_other_content_is_caught_by_its_hash(fingerprinted):
    config, _ = fingerprinted
    _rewrite(config["train_json"], '"kite"', '"kitE"')
    with pytest.raises(coco_dataset.StaleDatasetError, match="same size but different content"):
        coco_dataset.get_builder(config)


def test_a_touched_or_moved_json_with_the_same_content_is_not_stale(fingerprinted, tmp_path):
    config, _ = fingerprinted
    _rewrite(config["train_json"], '"kite"', '"kite"')  # a new modification time only
    assert coco_dataset.get_builder(config).is_prepared()
    moved = str(tmp_path / "moved.json")
    os.rename(config["train_json"], moved)
    assert coco_dataset.get_builder(dict(config, train_json=moved)).is_prepared()
    # Without the sources at hand (e.g. only the records were copied) there is nothing to compare.
    assert coco_dataset.get_builder(config).is_prepared()


def test_a_changed_image_folder_is_caught(fingerprinted):
    config, writer = fingerprinted
    _save_array(np.zeros((8, 8, 3), np.uint8))(os.path.join(writer.images_dir, "extra.png"))
    with pytest.raises(coco_dataset.StaleDatasetError, match="image folder .* holds 2 files"):
        coco_dataset.get_builder(config)


def test_a_dataset_built_before_fingerprints_compares_the_json_size():
    recorded = {"json": "/old/instances.json", "json_bytes": 10, "images": "/old/images"}
    assert coco_dataset.changed_sources(recorded, __file__, os.path.dirname(__file__))
    recorded["json_bytes"] = os.path.getsize(__file__)
    assert coco_dataset.changed_sources(recorded, __file__, os.path.dirname(__file__)) == []
