"""Datasets and images as untrusted input: file_names that escape their image folder, images whose header claims
a huge size (decompression bombs), and annotation files that are not UTF-8 JSON of COCO's shape. The builder,
coco_format and maskrcnn-predict each, on tiny files the tests write."""

import json
import os
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorflow_datasets")

from maskrcnn_jax import config as config_lib  # noqa: E402
from maskrcnn_jax import predict  # noqa: E402
from maskrcnn_jax.data import coco_dataset, coco_format, options  # noqa: E402
from maskrcnn_jax.engine import datasets  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from config_overrides import parse_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = [{"id": 1, "name": "thing"}]
BOMB_SIDE = 100_000  # a header of 100,000 x 100,000 RGB: 30 GB if it were decoded


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb_png(path, width=BOMB_SIDE, height=BOMB_SIDE):
    """A PNG of a few dozen bytes whose IHDR claims width x height 8-bit RGB pixels (its IDAT holds one row)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                + _chunk(b"IEND", b""))


def write_png(path, height=8, width=8, value=90):
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)


def write_json(path, images, annotations=(), categories=CATEGORIES):
    with open(path, "w") as f:
        json.dump({"images": list(images), "annotations": list(annotations), "categories": categories}, f)
    return str(path)


def build(tmp_path, name, json_path, images_dir, **build_options):
    return coco_dataset.build({"name": name, "data_dir": str(tmp_path / "tfds"), "train_json": json_path,
                               "train_images": str(images_dir), **build_options})


# ----------------------------------------------------------------------------------------------------
# file_names outside the image folder.


@pytest.fixture
def escape(tmp_path):
    """An image folder holding one good image, and outside it a secret image that file_names try to reach."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    write_png(images_dir / "good.png")
    outside = tmp_path / "secret"
    outside.mkdir()
    write_png(outside / "secret.png", value=200)
    os.symlink(outside / "secret.png", images_dir / "link.png")
    return images_dir, outside / "secret.png"


def _escaping_name(kind, images_dir, secret):
    return {"dotdot": "../secret/secret.png", "absolute": str(secret), "symlink": "link.png"}[kind]


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_a_file_name_outside_the_images_dir_is_an_error_naming_the_image(tmp_path, escape, kind):
    images_dir, secret = escape
    file_name = _escaping_name(kind, images_dir, secret)
    json_path = write_json(tmp_path / "instances.json", [{"id": 1, "file_name": "good.png"},
                                                         {"id": 7, "file_name": file_name}])
    with pytest.raises(coco_format.CocoFormatError) as error:
        build(tmp_path, f"escape_{kind}", json_path, images_dir)
    message = str(error.value)
    assert "image 7" in message and repr(file_name) in message and "outside" in message
    assert "allow_paths_outside_images_dir" in message
    assert not coco_dataset.get_builder({"name": f"escape_{kind}", "data_dir": str(tmp_path / "tfds")}).is_prepared()


def test_allow_paths_outside_images_dir_reads_them(tmp_path, escape):
    images_dir, secret = escape
    images = [{"id": i + 1, "file_name": _escaping_name(kind, images_dir, secret)}
              for i, kind in enumerate(["dotdot", "absolute", "symlink"])]
    json_path = write_json(tmp_path / "instances.json", images)
    builder = build(tmp_path, "allowed", json_path, images_dir, allow_paths_outside_images_dir=True)
    summary = coco_dataset.build_summary(builder)["train"]
    assert summary["images"] == 3 and summary["skipped_images"] == {}
    assert builder.info.metadata["build_options"]["allow_paths_outside_images_dir"] is True


def test_paths_that_stay_inside_are_read(tmp_path, escape):
    images_dir, _ = escape
    (images_dir / "sub").mkdir()
    write_png(images_dir / "sub" / "deep.png")
    os.symlink(images_dir / "good.png", images_dir / "sub" / "inner_link.png")  # a link that stays inside
    images = [{"id": 1, "file_name": "sub/../good.png"}, {"id": 2, "file_name": "sub/deep.png"},
              {"id": 3, "file_name": "sub/inner_link.png"}, {"id": 4, "file_name": str(images_dir / "good.png")}]
    for image in images:
        assert coco_format.image_path(str(images_dir), image) == os.path.join(str(images_dir), image["file_name"])
    with pytest.raises(coco_format.CocoFormatError, match="image 5 .*outside"):
        coco_format.image_path(str(images_dir), {"id": 5, "file_name": "a\0b.png"})


# ----------------------------------------------------------------------------------------------------
# Decompression bombs.


def test_a_bomb_header_is_a_counted_skip_in_the_builder(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    write_png(images_dir / "good.png")
    write_bomb_png(images_dir / "bomb.png")
    assert os.path.getsize(images_dir / "bomb.png") < 200
    json_path = write_json(tmp_path / "instances.json", [{"id": 1, "file_name": "good.png"},
                                                         {"id": 2, "file_name": "bomb.png"}])
    builder = build(tmp_path, "bomb", json_path, images_dir)
    summary = coco_dataset.build_summary(builder)["train"]
    assert summary["images"] == 1 and summary["images_in_json"] == 2
    assert summary["skipped_images"] == {"too_many_pixels": 1}
    assert "1 too_many_pixels" in coco_dataset.format_summary({"train": summary})


def test_max_image_pixels_is_the_builders_limit(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    write_png(images_dir / "big.png", 8, 8)  # 64 pixels
    write_png(images_dir / "small.png", 4, 4)  # 16 pixels
    json_path = write_json(tmp_path / "instances.json", [{"id": 1, "file_name": "big.png"},
                                                         {"id": 2, "file_name": "small.png"}])
    builder = build(tmp_path, "limited", json_path, images_dir, max_image_pixels=32)
    summary = coco_dataset.build_summary(builder)["train"]
    assert summary["images"] == 1 and summary["skipped_images"] == {"too_many_pixels": 1}
    assert builder.info.metadata["build_options"]["max_image_pixels"] == 32


def test_the_header_is_checked_before_decoding_whatever_pils_own_limit(tmp_path, monkeypatch):
    bomb = str(tmp_path / "bomb.png")
    write_bomb_png(bomb)
    # A limit above PIL's own hard stop lifts PIL's check for that open; the header still stops the bomb.
    for limit in (options.PIL_MAX_PIXELS, 10 * options.PIL_MAX_PIXELS):
        with pytest.raises(coco_format.ImageSkipped) as skipped:
            coco_format.load_image(bomb, limit)
        assert skipped.value.reason == "too_many_pixels" and f"{BOMB_SIDE} x {BOMB_SIDE}" in skipped.value.detail
    assert Image.MAX_IMAGE_PIXELS == options.PIL_MAX_PIXELS // 2  # put back
    # PIL's process-wide limit set lower than ours does not refuse an image within ours.
    small = str(tmp_path / "small.png")
    write_png(small, 8, 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert (coco_format.load_image(small, 1000).height, coco_format.load_image(small, 1000).width) == (8, 8)
    with pytest.raises(coco_format.ImageSkipped, match="too_many_pixels"):
        coco_format.load_image(small, 63)


class _FakeSpec:
    category_ids = (1,)
    names = ("thing",)
    keypoint_names = ()
    keypoint_skeleton = ()


class _FakePredictor:
    """What predict_files uses of a Predictor: no detections, one result per image it is fed."""

    spec = _FakeSpec()

    def predict_iter(self, images, score_threshold):
        for _ in images:
            yield {"scores": np.zeros(0), "boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64), "names": []}


def test_predict_skips_and_reports_a_bomb(tmp_path, capsys):
    write_png(tmp_path / "good.png")
    write_bomb_png(tmp_path / "bomb.png")
    paths = [str(tmp_path / "bomb.png"), str(tmp_path / "good.png")]
    out = tmp_path / "out"
    summary = predict.predict_files(_FakePredictor(), paths, str(out), progress=False)
    assert summary["images"] == 1
    assert [path for path, _ in summary["unreadable"]] == [paths[0]]
    assert "pixels" in summary["unreadable"][0][1]
    assert f"skipping {paths[0]}" in capsys.readouterr().err
    images = json.load(open(out / "images.json"))["images"]
    assert [(i["id"], i["file_name"]) for i in images] == [(2, paths[1])]  # our own absolute file_names


def test_predicts_limit_is_a_flag(tmp_path):
    write_png(tmp_path / "good.png", 8, 8)
    assert predict.parse_args(["--workdir", "w", "--out", "o", "x.png"]).max_image_pixels == options.PIL_MAX_PIXELS
    assert predict.parse_args(["--workdir", "w", "--out", "o", "--max-image-pixels", "63", "x.png"]
                              ).max_image_pixels == 63
    with pytest.raises(ValueError, match="more than max_image_pixels = 63"):
        predict.read_image(str(tmp_path / "good.png"), 63)
    summary = predict.predict_files(_FakePredictor(), [str(tmp_path / "good.png")], str(tmp_path / "out"),
                                    progress=False, max_pixels=63)
    assert summary["images"] == 0 and len(summary["unreadable"]) == 1
    assert predict.read_image(str(tmp_path / "good.png"), 64).shape == (8, 8, 3)


# ----------------------------------------------------------------------------------------------------
# The config fields.


def test_the_build_options_are_config_fields_with_safe_defaults():
    config = config_lib.base_config()
    assert config.data.allow_paths_outside_images_dir is False
    assert config.data.max_image_pixels == options.PIL_MAX_PIXELS == 178_956_970
    overridden = parse_config("test.py", "--config.data.allow_paths_outside_images_dir=True", "--config.data.max_image_pixels=1000")
    built_with = options.BuildOptions.from_config(overridden.data)
    assert built_with == options.BuildOptions(allow_paths_outside_images_dir=True, max_image_pixels=1000)
    builder = coco_dataset.get_builder({"name": "x", "data_dir": "/nonexistent", "max_image_pixels": 1000})
    assert builder.builder_config.options.max_image_pixels == 1000
    # Training builds from engine.datasets' sources: the config's options reach the builder that way too.
    overridden.data.data_dir = "/nonexistent"
    trained_with = coco_dataset.get_builder(datasets.dataset_sources(overridden.data)).builder_config.options
    assert trained_with == built_with
    with pytest.raises(ValueError, match="max_image_pixels"):
        options.BuildOptions(max_image_pixels=0)


# ----------------------------------------------------------------------------------------------------
# Annotation files that are not UTF-8 JSON of COCO's shape.

_IMAGE = {"id": 1, "file_name": "a.png"}


def _annotation(**fields):
    return json.dumps({"images": [_IMAGE], "categories": CATEGORIES,
                       "annotations": [{"id": 5, "image_id": 1, "category_id": 1, **fields}]}).encode()


@pytest.mark.parametrize("content, message", [
    (b'{"images": [], "annotations": [], "categories": [{"id": 1, "name": "caf\xe9"}]}', "not valid JSON"),  # latin-1
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[" * 200_000, "nests too deeply"),
    (json.dumps([{"images": []}]).encode(), "top level is not an object"),
    (json.dumps({"images": {}, "annotations": [], "categories": CATEGORIES}).encode(), "'images' is not a list"),
    (json.dumps({"images": [], "categories": CATEGORIES}).encode(), "missing key 'annotations'"),
    (json.dumps({"images": [], "annotations": []}).encode(), "missing key 'categories'"),
    (json.dumps({"images": ["a.png"], "annotations": [], "categories": CATEGORIES}).encode(), "needs an integer 'id'"),
    (_annotation(bbox="1234"), "annotation 5 .*bbox '1234'"),
    (_annotation(bbox=[1, 2, "3", 4]), "annotation 5 .*not a list of numbers"),
    (_annotation(area="large"), "annotation 5 .*area 'large'"),
    (_annotation(iscrowd="no"), "annotation 5 .*iscrowd 'no'"),
])
def test_bad_annotation_files_are_one_clear_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "instances.json"
    path.write_bytes(content)
    with pytest.raises(coco_format.CocoFormatError, match=message) as error:
        coco_format.load_coco_annotations(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("segmentation", [
    {"counts": "!!!!", "size": [8, 8]},  # compressed counts pycocotools refuses
    {"counts": [0, 10**6], "size": [8, 8]},  # runs past the image
    {"counts": "ab", "size": ["eight", 8]},
    [[1, 1, "x", 5, 5, 5]],  # a polygon with a string in it
])
def test_segmentations_that_cannot_be_decoded_are_skipped_annotations(segmentation):
    categories = coco_format.CategoryMap.from_coco_categories(CATEGORIES)
    with pytest.raises(coco_format.InstanceSkipped) as skipped:
        coco_format.parse_instance({"id": 5, "image_id": 1, "category_id": 1, "segmentation": segmentation,
                                    "bbox": [1, 1, 4, 4]}, categories, 8, 8)
    assert skipped.value.reason == "invalid_segmentation"
