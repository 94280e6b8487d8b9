"""A TFDS builder for any COCO-format instance-segmentation dataset (COCO 2017 included).

Input per split: an annotation JSON and the folder its `file_name`s are relative to. The dataset is named
by a config (`data.name`, e.g. "coco2017" or "shapes") and lands in
`{data_dir}/coco_instances/{name}/{VERSION}/`. Splits: "train" (from `train_json`/`train_images`) and
"validation" (from `val_json`/`val_images`); either may be left out.

Stored per example (see `_info`):
  image       upright 8-bit RGB, encoded (the file's own JPEG/PNG bytes, or a lossless PNG when the file
              needed rotating or converting; see coco_format.load_image)
  image_id    the JSON's image id;  file_name;  height, width (of the upright image)
  objects     a sequence, non-crowd instances first, then crowd regions, each with
    box          float32 [4] xyxy in pixels of the upright image (not normalized), inside the image
    label        int32 contiguous 1..K (0 is background and never stored)
    category_id  int64 the JSON's category id
    is_crowd     bool
    area         float32 the annotation's area (COCO eval's size buckets), else the mask's pixel count
    mask         the full-image instance mask, PNG-encoded, uint8 values {0, 1}, shape [height, width, 1]

Kept with the dataset (`builder.info.metadata`, i.e. metadata.json next to the records):
  categories     [{label, category_id, name}], see `load_category_map`
  build_summary  per split: images, instances, crowd regions, skipped images/annotations by reason
  sources        the JSON and image folder each split was built from

A prepared dataset is never rebuilt: after changing the annotation files, delete its folder or use a new
`data.name`. `get_builder` warns when the JSON it is given differs in size from the one the data was built
from.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from maskrcnn_jax.data import coco_format
from maskrcnn_jax.data.devices import hide_accelerators_from_tensorflow

SPLITS = {"train": ("train_json", "train_images"), "validation": ("val_json", "val_images")}
_IMAGES_PER_CHUNK = 64  # bounds memory: at most this many decoded images are in flight


class DatasetBuildError(RuntimeError):
    """The dataset cannot be built from these files (e.g. not one image could be read)."""


@dataclasses.dataclass(eq=False)
class CocoInstancesConfig(tfds.core.BuilderConfig):
    """Names one COCO-format dataset: `name` plus the annotation JSON and image folder of each split."""

    train_json: str | None = None
    train_images: str | None = None
    val_json: str | None = None
    val_images: str | None = None


@dataclasses.dataclass
class SplitSummary:
    images_in_json: int = 0
    images: int = 0
    empty_images: int = 0
    instances: int = 0
    crowd_regions: int = 0
    reencoded_images: int = 0
    skipped_images: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped_annotations: dict[str, int] = dataclasses.field(default_factory=dict)


def format_summary(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Human-readable build summary, one block per split."""
    lines = []
    for split, s in summaries.items():
        lines.append(
            f"{split}: {s['images']} images written of {s['images_in_json']} in the JSON "
            f"({s['empty_images']} without instances, {s['reencoded_images']} re-encoded), "
            f"{s['instances']} instances, {s['crowd_regions']} crowd regions")
        for kind in ("skipped_images", "skipped_annotations"):
            skipped = s[kind]
            described = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none"
            lines.append(f"  {kind.replace('_', ' ')}: {described}")
    return "\n".join(lines)


def _load_one_image(image_entry: Mapping[str, Any], annotations: list[dict[str, Any]],
                    categories: coco_format.CategoryMap, images_dir: str):
    """-> (example or None, skipped-image reason or None, [(annotation name, reason, detail)])."""
    path = os.path.join(images_dir, image_entry["file_name"])
    try:
        loaded = coco_format.load_image(path)
    except coco_format.ImageSkipped as e:
        return None, (e.reason, e.detail), []
    expected = (image_entry.get("height", loaded.height), image_entry.get("width", loaded.width))
    if expected != (loaded.height, loaded.width):
        return None, ("size_mismatch", f"{path}: the upright image is {loaded.height}x{loaded.width} (HxW) "
                                       f"but the JSON says {expected[0]}x{expected[1]}"), []
    instances, skipped = [], []
    for annotation in annotations:
        try:
            instances.append(coco_format.parse_instance(annotation, categories, loaded.height, loaded.width))
        except coco_format.InstanceSkipped as e:
            skipped.append((f"annotation {annotation.get('id', '?')} in {path}", e.reason, e.detail))
    # Non-crowd first: a pipeline that truncates to max_instances drops ignore regions before objects.
    instances.sort(key=lambda inst: inst.is_crowd)
    example = {
        "image": loaded.encoded,
        "image_id": int(image_entry["id"]),
        "file_name": image_entry["file_name"],
        "height": loaded.height,
        "width": loaded.width,
        "objects": {
            "box": np.asarray([i.box for i in instances], np.float32).reshape(-1, 4),
            "label": np.asarray([i.label for i in instances], np.int32),
            "category_id": np.asarray([i.category_id for i in instances], np.int64),
            "is_crowd": np.asarray([i.is_crowd for i in instances], np.bool_),
            "area": np.asarray([i.area for i in instances], np.float32),
            "mask": [coco_format.encode_mask_png(i.mask) for i in instances],
        },
    }
    return (example, loaded.reencoded), None, skipped


class CocoInstances(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """COCO-format instance segmentation: images, boxes, contiguous labels, crowd flags and masks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    # TFDS derives this from the module through `importlib_resources`, a package it does not declare;
    # giving the path directly keeps building independent of that.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="COCO-format instance segmentation built from a local annotation JSON and images.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image_id": np.int64,
                "file_name": tfds.features.Text(),
                "height": np.int32,
                "width": np.int32,
                "objects": tfds.features.Sequence({
                    "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "label": np.int32,
                    "category_id": np.int64,
                    "is_crowd": np.bool_,
                    "area": np.float32,
                    "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                }),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        config = self.builder_config
        indexes = {}
        for split, (json_field, images_field) in SPLITS.items():
            json_path, images_dir = getattr(config, json_field), getattr(config, images_field)
            if not json_path:
                continue
            if not images_dir:
                raise ValueError(f"{json_field} is set but {images_field} is not")
            indexes[split] = (coco_format.load_coco_annotations(json_path), images_dir)
        if not indexes:
            raise ValueError("no split to build: set train_json/train_images and/or val_json/val_images")

        category_maps = {split: index.categories for split, (index, _) in indexes.items()}
        first_split, categories = next(iter(category_maps.items()))
        for split, other in category_maps.items():
            if other != categories:
                raise coco_format.CocoFormatError(
                    f"the categories of {split} ({indexes[split][0].path}) differ from those of {first_split} "
                    f"({indexes[first_split][0].path}); one category list must serve both splits")

        metadata = self.info.metadata
        metadata["categories"] = categories.to_json()
        metadata["build_summary"] = {}
        metadata["sources"] = {
            split: {"json": os.path.abspath(index.path), "json_bytes": os.path.getsize(index.path),
                    "images": os.path.abspath(images_dir)}
            for split, (index, images_dir) in indexes.items()}
        return {split: self._generate_examples(split, index, images_dir)
                for split, (index, images_dir) in indexes.items()}

    def _generate_examples(self, split: str, index: coco_format.CocoIndex, images_dir: str) -> Iterator:
        summary = SplitSummary(images_in_json=len(index.images))
        if not index.images:
            raise coco_format.CocoFormatError(f"{index.path} lists no images")
        skipped_images = collections.Counter()
        skipped_annotations = collections.Counter()
        workers = min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(index.images), _IMAGES_PER_CHUNK):
                chunk = index.images[start:start + _IMAGES_PER_CHUNK]
                results = pool.map(
                    lambda entry: _load_one_image(entry, index.annotations_by_image.get(entry["id"], []),
                                                  index.categories, images_dir), chunk)
                for entry, (loaded, image_skip, annotation_skips) in zip(chunk, results):
                    if image_skip is not None:
                        reason, detail = image_skip
                        skipped_images[reason] += 1
                        logging.warning("skipped image %s (id %s): %s: %s", entry["file_name"], entry["id"], reason,
                                        detail)
                        continue
                    for name, reason, detail in annotation_skips:
                        skipped_annotations[reason] += 1
                        logging.warning("skipped %s: %s: %s", name, reason, detail)
                    example, reencoded = loaded
                    crowd = int(example["objects"]["is_crowd"].sum())
                    summary.images += 1
                    summary.reencoded_images += int(reencoded)
                    summary.instances += len(example["objects"]["label"]) - crowd
                    summary.crowd_regions += crowd
                    summary.empty_images += int(len(example["objects"]["label"]) == 0)
                    yield example["image_id"], example
        summary.skipped_images = dict(skipped_images)
        summary.skipped_annotations = dict(skipped_annotations)
        if summary.images == 0:
            raise DatasetBuildError(
                f"not one image of split '{split}' could be read from {images_dir} "
                f"({len(index.images)} listed in {index.path}; skipped: {dict(skipped_images)})")
        self.info.metadata["build_summary"][split] = dataclasses.asdict(summary)
        logging.info("built split %s:\n%s", split, format_summary({split: dataclasses.asdict(summary)}))


# ----------------------------------------------------------------------------------------------------
# Entry points for configs: a ConfigDict (or any object / mapping) with
#   name, data_dir, train_json, train_images, val_json, val_images.


def _field(data_config: Any, key: str) -> Any:
    if isinstance(data_config, Mapping):
        return data_config.get(key)
    return getattr(data_config, key, None)


def get_builder(data_config: Any) -> CocoInstances:
    """The builder for `data_config` (built or not). Reads `name`, `data_dir` and the four split paths."""
    hide_accelerators_from_tensorflow()
    name, data_dir = _field(data_config, "name"), _field(data_config, "data_dir")
    if not name or not data_dir:
        raise ValueError("the data config needs a dataset `name` and a `data_dir`")
    paths = {key: (os.fspath(value) if value else None)
             for key in ("train_json", "train_images", "val_json", "val_images")
             for value in [_field(data_config, key)]}
    builder = CocoInstances(config=CocoInstancesConfig(name=name, **paths), data_dir=os.fspath(data_dir))
    if builder.is_prepared():
        sources = builder.info.metadata.get("sources", {})
        for split, (json_field, _) in SPLITS.items():
            json_path = paths[json_field]
            built_from = sources.get(split)
            if json_path and built_from and os.path.isfile(json_path) and \
                    os.path.getsize(json_path) != built_from["json_bytes"]:
                logging.warning(
                    "dataset '%s' in %s was built from %s (%d bytes) but %s is now %d bytes: it is stale; delete "
                    "%s or choose a new data.name to rebuild", name, data_dir, built_from["json"],
                    built_from["json_bytes"], json_path, os.path.getsize(json_path), builder.data_dir)
    return builder


def build(data_config: Any) -> CocoInstances:
    """Builds the dataset named by `data_config` unless it is already built, and returns its builder."""
    builder = get_builder(data_config)
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder


def load_category_map(builder: tfds.core.DatasetBuilder) -> coco_format.CategoryMap:
    """The category id <-> label <-> name map stored with a built dataset."""
    return coco_format.CategoryMap.from_json(builder.info.metadata["categories"])


def build_summary(builder: tfds.core.DatasetBuilder) -> dict[str, dict[str, Any]]:
    """What the build wrote and skipped, per split (see SplitSummary)."""
    return dict(builder.info.metadata.get("build_summary", {}))
