"""A TFDS builder for any COCO-format instance-segmentation (and keypoint) dataset (COCO 2017 included).

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
    keypoints    float32 [K, 3] (x, y, v) in pixels of the upright image, as the JSON gives them; (0, 0, 0) where
                 unlabelled, and for every keypoint of a category without keypoints. K = 0 when the dataset has
                 no keypoints. (Version 1.1.0 on; see coco_format for how bad keypoints are handled.)
    num_keypoints  int32, the labelled keypoints (v > 0) of `keypoints`

Kept with the dataset (`builder.info.metadata`, i.e. metadata.json next to the records):
  categories     [{label, category_id, name}], see `load_category_map`
  keypoints      None, or {names, skeleton (0-based index pairs), oks_sigmas (None unless the JSON's categories
                 give `kpt_oks_sigmas`), category_ids}, see `load_keypoint_schema`
  build_summary  per split: images, instances, crowd regions, skipped images/annotations by reason, keypoint
                 instances, labelled keypoints and keypoint corrections by reason
  sources        per split, the JSON and image folder it was built from and their fingerprint: the JSON's size,
                 modification time and SHA-256, the folder's file count and total size

A prepared dataset is never rebuilt, and never silently stale: `get_builder` compares the sources it is given
with the recorded fingerprint and raises StaleDatasetError, naming what changed, when they differ. Delete the
dataset's folder to rebuild it, or choose a new `data.name`. (It stops rather than rebuilds because other runs
may be reading the records, and rebuilding COCO takes long enough to deserve a decision.) The check costs a
directory walk of each image folder and, when the JSON's modification time changed, one hash of it.

Datasets built before keypoint support (version 1.0.0, no `keypoints` feature) are still read as they are.

The JSON and the images are untrusted (data/options.py's BuildOptions, `data.allow_paths_outside_images_dir` and
`data.max_image_pixels`): a `file_name` that resolves outside its split's image folder stops the build before any
image is read, with an error naming each such image (the first few); an image whose header claims more than
`max_image_pixels` pixels is skipped undecoded and counted as `too_many_pixels`. The options the dataset was built
with are kept in the metadata (`build_options`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import os
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from maskrcnn_jax.data import coco_format
from maskrcnn_jax.data.devices import hide_accelerators_from_tensorflow
from maskrcnn_jax.data.keypoints import KeypointSchema
from maskrcnn_jax.data.options import BuildOptions

SPLITS = {"train": ("train_json", "train_images"), "validation": ("val_json", "val_images")}
_IMAGES_PER_CHUNK = 64  # bounds memory: at most this many decoded images are in flight


class DatasetBuildError(RuntimeError):
    """The dataset cannot be built from these files (e.g. not one image could be read)."""


class StaleDatasetError(RuntimeError):
    """A built dataset's recorded sources differ from the annotation files and images it is now given."""


@dataclasses.dataclass(eq=False)
class CocoInstancesConfig(tfds.core.BuilderConfig):
    """Names one COCO-format dataset: `name` plus the annotation JSON and image folder of each split, and how they
    are read (`options`, see BuildOptions)."""

    train_json: str | None = None
    train_images: str | None = None
    val_json: str | None = None
    val_images: str | None = None
    options: BuildOptions = dataclasses.field(default_factory=BuildOptions)


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
    keypoint_instances: int = 0  # non-crowd instances with at least one labelled keypoint
    labelled_keypoints: int = 0  # over all instances
    keypoint_corrections: dict[str, int] = dataclasses.field(default_factory=dict)  # annotations, by reason


def format_summary(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Human-readable build summary, one block per split."""
    lines = []
    for split, s in summaries.items():
        lines.append(
            f"{split}: {s['images']} images written of {s['images_in_json']} in the JSON "
            f"({s['empty_images']} without instances, {s['reencoded_images']} re-encoded), "
            f"{s['instances']} instances, {s['crowd_regions']} crowd regions")
        kinds = ["skipped_images", "skipped_annotations"]
        if s.get("keypoint_instances") or s.get("keypoint_corrections"):
            lines.append(f"  keypoints: {s['labelled_keypoints']} labelled on {s['keypoint_instances']} instances")
            kinds.append("keypoint_corrections")
        for kind in kinds:
            described = ", ".join(f"{n} {reason}" for reason, n in sorted(s[kind].items())) or "none"
            lines.append(f"  {kind.replace('_', ' ')}: {described}")
    return "\n".join(lines)


_PATH_ERRORS_SHOWN = 5


def check_image_paths(index: coco_format.CocoIndex, images_dir: str, options: BuildOptions) -> None:
    """CocoFormatError naming the images (the first few, and how many in all) whose file_name resolves outside
    `images_dir`, unless `options.allow_paths_outside_images_dir` (see coco_format.image_path)."""
    if options.allow_paths_outside_images_dir:
        return
    errors = []
    for image in index.images:
        try:
            coco_format.image_path(images_dir, image)
        except coco_format.CocoFormatError as e:
            errors.append(str(e))
    if errors:
        shown = "\n  ".join(errors[:_PATH_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - _PATH_ERRORS_SHOWN} more" if len(errors) > _PATH_ERRORS_SHOWN else ""
        raise coco_format.CocoFormatError(
            f"{index.path}: {len(errors)} of its {len(index.images)} images lie outside {images_dir}:\n  "
            f"{shown}{more}")


def _load_one_image(image_entry: Mapping[str, Any], annotations: list[dict[str, Any]],
                    categories: coco_format.CategoryMap, keypoint_schema: KeypointSchema | None, images_dir: str,
                    options: BuildOptions = BuildOptions()):
    """-> (example or None, skipped-image reason or None, [(annotation name, reason, detail)],
    [(annotation name, keypoint correction reason, detail)])."""
    path = coco_format.image_path(images_dir, image_entry, options.allow_paths_outside_images_dir)
    try:
        loaded = coco_format.load_image(path, options.max_image_pixels)
    except coco_format.ImageSkipped as e:
        return None, (e.reason, e.detail), [], []
    expected = (image_entry.get("height", loaded.height), image_entry.get("width", loaded.width))
    if expected != (loaded.height, loaded.width):
        return None, ("size_mismatch", f"{path}: the upright image is {loaded.height}x{loaded.width} (HxW) "
                                       f"but the JSON says {expected[0]}x{expected[1]}"), [], []
    instances, skipped, corrected = [], [], []
    for annotation in annotations:
        name = f"annotation {annotation.get('id', '?')} in {path}"
        try:
            instance = coco_format.parse_instance(annotation, categories, loaded.height, loaded.width,
                                                  keypoint_schema)
        except coco_format.InstanceSkipped as e:
            skipped.append((name, e.reason, e.detail))
            continue
        instances.append(instance)
        corrected += [(name, reason, detail) for reason, detail in instance.keypoint_corrections]
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
    num_keypoints = keypoint_schema.num_keypoints if keypoint_schema else 0
    example["objects"]["keypoints"] = np.asarray([i.keypoints for i in instances], np.float32).reshape(
        len(instances), num_keypoints, 3)
    example["objects"]["num_keypoints"] = np.asarray([i.num_keypoints for i in instances], np.int32)
    return (example, loaded.reencoded), None, skipped, corrected


class CocoInstances(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """COCO-format instance segmentation: images, boxes, contiguous labels, crowd flags, masks and keypoints."""

    VERSION = tfds.core.Version("1.1.0")
    # Still read (get_builder falls back to it when only it is built); no longer written.
    SUPPORTED_VERSIONS = [tfds.core.Version("1.0.0")]
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "1.1.0": "Per-object keypoints and num_keypoints; the keypoint schema and source fingerprints "
                              "in the metadata."}
    # TFDS derives this from the module through `importlib_resources`, a package it does not declare;
    # giving the path directly keeps building independent of that.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        objects = {
            "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "label": np.int32,
            "category_id": np.int64,
            "is_crowd": np.bool_,
            "area": np.float32,
            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        }
        if self.version >= "1.1.0":
            # K is the dataset's, unknown here; a byte encoding stores each object's shape with it.
            objects["keypoints"] = tfds.features.Tensor(shape=(None, 3), dtype=np.float32, encoding="bytes")
            objects["num_keypoints"] = np.int32
        return self.dataset_info_from_configs(
            description="COCO-format instance segmentation built from a local annotation JSON and images.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image_id": np.int64,
                "file_name": tfds.features.Text(),
                "height": np.int32,
                "width": np.int32,
                "objects": tfds.features.Sequence(objects),
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
            index = coco_format.load_coco_annotations(json_path)
            check_image_paths(index, images_dir, config.options)
            indexes[split] = (index, images_dir)
        if not indexes:
            raise ValueError("no split to build: set train_json/train_images and/or val_json/val_images")

        first_split, (first_index, _) = next(iter(indexes.items()))
        for split, (index, _) in indexes.items():
            for what, key in (("categories", "categories"), ("keypoints", "keypoints")):
                if getattr(index, key) != getattr(first_index, key):
                    raise coco_format.CocoFormatError(
                        f"the {what} of {split} ({index.path}) differ from those of {first_split} "
                        f"({first_index.path}); one category list must serve both splits")

        metadata = self.info.metadata
        metadata["categories"] = first_index.categories.to_json()
        metadata["keypoints"] = first_index.keypoints.to_json() if first_index.keypoints else None
        metadata["build_summary"] = {}
        metadata["build_options"] = dataclasses.asdict(config.options)
        metadata["sources"] = {
            split: source_fingerprint(index.path, images_dir, exclude_dir=os.fspath(self.data_dir_root))
            for split, (index, images_dir) in indexes.items()}
        return {split: self._generate_examples(split, index, images_dir)
                for split, (index, images_dir) in indexes.items()}

    def _generate_examples(self, split: str, index: coco_format.CocoIndex, images_dir: str) -> Iterator:
        summary = SplitSummary(images_in_json=len(index.images))
        if not index.images:
            raise coco_format.CocoFormatError(f"{index.path} lists no images")
        skipped_images = collections.Counter()
        skipped_annotations = collections.Counter()
        keypoint_corrections = collections.Counter()
        workers = min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(index.images), _IMAGES_PER_CHUNK):
                chunk = index.images[start:start + _IMAGES_PER_CHUNK]
                results = pool.map(
                    lambda entry: _load_one_image(entry, index.annotations_by_image.get(entry["id"], []),
                                                  index.categories, index.keypoints, images_dir,
                                                  self.builder_config.options), chunk)
                for entry, (loaded, image_skip, annotation_skips, corrections) in zip(chunk, results):
                    if image_skip is not None:
                        reason, detail = image_skip
                        skipped_images[reason] += 1
                        logging.warning("skipped image %s (id %s): %s: %s", entry["file_name"], entry["id"], reason,
                                        detail)
                        continue
                    for name, reason, detail in annotation_skips:
                        skipped_annotations[reason] += 1
                        logging.warning("skipped %s: %s: %s", name, reason, detail)
                    for name, reason, detail in corrections:
                        keypoint_corrections[reason] += 1
                        logging.warning("corrected the keypoints of %s: %s: %s", name, reason, detail)
                    example, reencoded = loaded
                    objects = example["objects"]
                    crowd = int(objects["is_crowd"].sum())
                    summary.keypoint_instances += int(((objects["num_keypoints"] > 0) & ~objects["is_crowd"]).sum())
                    summary.labelled_keypoints += int(objects["num_keypoints"].sum())
                    summary.images += 1
                    summary.reencoded_images += int(reencoded)
                    summary.instances += len(example["objects"]["label"]) - crowd
                    summary.crowd_regions += crowd
                    summary.empty_images += int(len(example["objects"]["label"]) == 0)
                    yield example["image_id"], example
        summary.skipped_images = dict(skipped_images)
        summary.skipped_annotations = dict(skipped_annotations)
        summary.keypoint_corrections = dict(keypoint_corrections)
        if summary.images == 0:
            raise DatasetBuildError(
                f"not one image of split '{split}' could be read from {images_dir} "
                f"({len(index.images)} listed in {index.path}; skipped: {dict(skipped_images)})")
        self.info.metadata["build_summary"][split] = dataclasses.asdict(summary)
        logging.info("built split %s:\n%s", split, format_summary({split: dataclasses.asdict(summary)}))


# ----------------------------------------------------------------------------------------------------
# Entry points for configs: a ConfigDict (or any object / mapping) with
#   name, data_dir, train_json, train_images, val_json, val_images, and optionally the fields of BuildOptions
#   (allow_paths_outside_images_dir, max_image_pixels; their defaults where absent).


def _field(data_config: Any, key: str) -> Any:
    if isinstance(data_config, Mapping):
        return data_config.get(key)
    return getattr(data_config, key, None)


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _folder_size(folder: str, exclude_dir: str | None) -> tuple[int, int]:
    """(number of files, their total bytes) under `folder`, recursively, leaving out `exclude_dir`."""
    excluded = os.path.abspath(exclude_dir) if exclude_dir else None
    files = total = 0
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if os.path.abspath(os.path.join(root, d)) != excluded]
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_size
                files += 1
            except OSError:  # a dangling link or a file removed while walking
                pass
    return files, total


def source_fingerprint(json_path: str, images_dir: str, exclude_dir: str | None = None) -> dict[str, Any]:
    """What a split is built from, recorded so that a changed source is noticed (see `get_builder`)."""
    stat = os.stat(json_path)
    files, total = _folder_size(images_dir, exclude_dir)
    return {"json": os.path.abspath(json_path), "json_bytes": stat.st_size, "json_mtime_ns": stat.st_mtime_ns,
            "json_sha256": _file_sha256(json_path), "images": os.path.abspath(images_dir), "image_files": files,
            "image_bytes": total}


def changed_sources(recorded: Mapping[str, Any], json_path: str | None, images_dir: str | None,
                    exclude_dir: str | None = None) -> list[str]:
    """How the sources now given differ from `recorded` (a `source_fingerprint`), one sentence each; empty when
    they match. Sources that are not there to compare (no path, or no such file) are not compared; so are the
    parts a dataset built before fingerprints (version 1.0.0: the JSON's size only) did not record."""
    changes = []
    if json_path and os.path.isfile(json_path):
        stat = os.stat(json_path)
        recorded_hash = recorded.get("json_sha256")
        described = f"JSON {json_path} (built from {recorded['json']})"
        if stat.st_size != recorded["json_bytes"]:
            changes.append(f"{described} is {stat.st_size} bytes, was {recorded['json_bytes']}")
        elif recorded_hash and stat.st_mtime_ns != recorded.get("json_mtime_ns") and \
                _file_sha256(json_path) != recorded_hash:
            changes.append(f"{described} has the same size but different content (SHA-256)")
    if images_dir and os.path.isdir(images_dir) and "image_files" in recorded:
        files, total = _folder_size(images_dir, exclude_dir)
        if (files, total) != (recorded["image_files"], recorded["image_bytes"]):
            changes.append(f"image folder {images_dir} (built from {recorded['images']}) holds {files} files of "
                           f"{total} bytes, was {recorded['image_files']} files of {recorded['image_bytes']} bytes")
    return changes


def _prepared_version(config: CocoInstancesConfig, data_dir: str) -> CocoInstances:
    """The builder of the current version; else of an older supported version that is built; else unbuilt."""
    builder = CocoInstances(config=config, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    for version in CocoInstances.SUPPORTED_VERSIONS:
        older = CocoInstances(config=config, data_dir=data_dir, version=version)
        if older.is_prepared():
            logging.warning("dataset '%s' in %s was built at version %s, before keypoint support: it is read as it "
                            "is, without keypoints; delete it to rebuild at %s", config.name, older.data_dir,
                            version, CocoInstances.VERSION)
            return older
    return builder


def get_builder(data_config: Any) -> CocoInstances:
    """The builder for `data_config` (built or not). Reads `name`, `data_dir`, the four split paths and the
    BuildOptions fields (defaults where absent).

    Raises StaleDatasetError when the dataset is built and the sources given differ from those it was built
    from (see the module doc).
    """
    hide_accelerators_from_tensorflow()
    name, data_dir = _field(data_config, "name"), _field(data_config, "data_dir")
    if not name or not data_dir:
        raise ValueError("the data config needs a dataset `name` and a `data_dir`")
    paths = {key: (os.fspath(value) if value else None)
             for key in ("train_json", "train_images", "val_json", "val_images")
             for value in [_field(data_config, key)]}
    options = BuildOptions.from_config(data_config)
    builder = _prepared_version(CocoInstancesConfig(name=name, **paths, options=options), os.fspath(data_dir))
    if builder.is_prepared():
        sources = builder.info.metadata.get("sources", {})
        changes = [f"{split}: {change}"
                   for split, (json_field, images_field) in SPLITS.items() if split in sources
                   for change in changed_sources(sources[split], paths[json_field], paths[images_field],
                                                 exclude_dir=os.fspath(data_dir))]
        if changes:
            dataset_dir = os.path.dirname(builder.data_dir)
            raise StaleDatasetError(
                f"dataset '{name}' in {builder.data_dir} is stale: its sources changed since it was built:\n  "
                + "\n  ".join(changes)
                + f"\nDelete {dataset_dir} to rebuild it from the current files, or set a new data.name.")
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


def load_keypoint_schema(builder: tfds.core.DatasetBuilder) -> KeypointSchema | None:
    """The keypoint names, skeleton, OKS sigmas and keypoint categories of a built dataset; None without keypoints
    (and for datasets built before keypoint support)."""
    entry = builder.info.metadata.get("keypoints")
    return KeypointSchema.from_json(entry) if entry else None


def build_summary(builder: tfds.core.DatasetBuilder) -> dict[str, dict[str, Any]]:
    """What the build wrote and skipped, per split (see SplitSummary)."""
    return dict(builder.info.metadata.get("build_summary", {}))
