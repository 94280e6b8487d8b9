"""Reading COCO-format instance annotations: validation, the category map, images, instance masks and keypoints.

Everything here is plain Python/NumPy/PIL/pycocotools and runs at dataset build time. The TFDS builder
(`builder.py`) calls it once per image; nothing here touches TensorFlow.

Coordinates are continuous pixels of the upright image: pixel `k` covers `[k, k+1)`. COCO's `bbox` is
`[x, y, w, h]`; it becomes `(x1, y1, x2, y2) = (x, y, x + w, y + h)` here and never goes back.
Annotations are taken to describe the image as displayed, i.e. after its EXIF orientation is applied
(detectron2's convention), so images are rotated upright here and their size checked against the JSON.
Keypoints, like boxes, are read as the JSON gives them: continuous pixels of the upright image, no shift
(detectron2 adds 0.5, taking COCO's integer keypoints for pixel indices; here they stay as written, so that
ground truth and results meet in one frame without a correction on either side).

Keypoints (COCO's person_keypoints format): a category may name its keypoints (`keypoints`, a list of names),
connect them (`skeleton`, 1-based index pairs) and, as an extension of this project, give their OKS sigmas
(`kpt_oks_sigmas`, pycocotools' name). An annotation of such a category carries `keypoints`, a flat list of
K (x, y, v) triples with v = 0 unlabelled, 1 labelled but not visible, 2 visible. What is done with bad input:
  a category list whose keypoint categories name different keypoints, a bad skeleton or sigmas,
  or labelled keypoints on a category without keypoint names       -> CocoFormatError (the file is wrong)
  keypoints that are not 3K numbers, or a visibility outside {0,1,2} -> the annotation is kept without
                                                                        keypoints (all v = 0), counted
  a labelled keypoint outside the image                             -> that keypoint becomes (0, 0, 0), counted
  v = 0 with a non-zero position; a `num_keypoints` that disagrees  -> position zeroed / count recomputed, counted
The counts are the build summary's `keypoint_corrections` (see builder.py); each is logged too.

The files are untrusted: an annotation file that is not UTF-8 JSON of COCO's shape is a CocoFormatError naming the
file; an image `file_name` that resolves outside its image folder is a CocoFormatError naming the image (unless the
caller allows it, `image_path`); and an image whose header claims more than `max_image_pixels` pixels is never
decoded (`open_image`, ImageSkipped('too_many_pixels')).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import io
import json
import os
import threading
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils

from maskrcnn_jax.data.keypoints import KeypointSchema
from maskrcnn_jax.data.options import PIL_MAX_PIXELS

_EXIF_ORIENTATION_TAG = 0x0112


class CocoFormatError(ValueError):
    """The annotation file is not a valid COCO instances file, or contradicts itself."""


class ImageSkipped(Exception):
    """An image that is left out of the dataset; `reason` is a short key used for counting."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------------
# Categories.


@dataclasses.dataclass(frozen=True)
class CategoryMap:
    """Dataset category ids <-> contiguous labels 1..K (0 is background) <-> names.

    Labels follow ascending category id, so COCO's ids 1..90 with gaps become 1..80 in the usual order.
    """

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        if len(self.category_ids) != len(self.names):
            raise ValueError("category_ids and names differ in length")
        if list(self.category_ids) != sorted(set(self.category_ids)):
            raise ValueError(f"category ids must be unique and ascending, got {self.category_ids}")

    @classmethod
    def from_coco_categories(cls, categories: Iterable[Mapping[str, Any]]) -> "CategoryMap":
        ordered = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(int(c["id"]) for c in ordered), tuple(str(c["name"]) for c in ordered))

    @property
    def num_classes(self) -> int:
        """K, the number of foreground classes (the model has K + 1 outputs with background)."""
        return len(self.category_ids)

    def label(self, category_id: int) -> int:
        """Contiguous label in 1..K of a dataset category id; KeyError for an unknown id."""
        return self._label_of_id[int(category_id)]

    def category_id(self, label: int) -> int:
        """Dataset category id of a contiguous label in 1..K."""
        if not 1 <= label <= self.num_classes:
            raise KeyError(f"label {label} is outside 1..{self.num_classes}")
        return self.category_ids[label - 1]

    def name(self, label: int) -> str:
        return "background" if label == 0 else self.names[label - 1]

    def label_to_category_id_array(self) -> np.ndarray:
        """int64 [K + 1] lookup table, entry 0 (background) is -1: `table[labels]` maps model output to ids."""
        return np.asarray((-1,) + self.category_ids, np.int64)

    def to_json(self) -> list[dict[str, Any]]:
        return [{"label": i + 1, "category_id": c, "name": n}
                for i, (c, n) in enumerate(zip(self.category_ids, self.names))]

    @classmethod
    def from_json(cls, entries: Sequence[Mapping[str, Any]]) -> "CategoryMap":
        ordered = sorted(entries, key=lambda e: e["label"])
        if [e["label"] for e in ordered] != list(range(1, len(ordered) + 1)):
            raise ValueError("stored category map does not have labels 1..K")
        return cls(tuple(int(e["category_id"]) for e in ordered), tuple(str(e["name"]) for e in ordered))

    @functools.cached_property
    def _label_of_id(self) -> dict[int, int]:
        return {c: i + 1 for i, c in enumerate(self.category_ids)}


# ----------------------------------------------------------------------------------------------------
# The annotation file.


@dataclasses.dataclass
class CocoIndex:
    """A validated annotation file: images in file order, annotations grouped by image, categories, and the
    keypoint schema (None when no category names keypoints)."""

    path: str
    images: list[dict[str, Any]]
    annotations_by_image: dict[int, list[dict[str, Any]]]
    categories: CategoryMap
    keypoints: KeypointSchema | None = None


def _require(condition: bool, path: str, message: str) -> None:
    if not condition:
        raise CocoFormatError(f"{path} is not a valid COCO instances file: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_coco_annotations(path: str | os.PathLike) -> CocoIndex:
    """Reads and validates a COCO instances JSON. Raises CocoFormatError with the reason when it is not one.

    Checks: that it is UTF-8 (or UTF-16/32) JSON, the top-level keys and their types, unique image and category
    ids, every annotation names an existing image and a category from the category list (the error names the
    annotation and the id), the types of its bbox, area and iscrowd, and the keypoint declarations of the
    categories (see the module doc). Segmentations are checked per annotation when decoded (`parse_instance`).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"{path} is not valid JSON: {e}") from e
    except RecursionError as e:  # arrays or objects nested thousands deep
        raise CocoFormatError(f"{path} is not a valid COCO instances file: it nests too deeply to read ({e})") from e
    _require(isinstance(data, dict), path, "the top level is not an object")
    for key in ("images", "annotations", "categories"):
        _require(key in data, path, f"missing key '{key}'")
        _require(isinstance(data[key], list), path, f"'{key}' is not a list")
    _require(len(data["categories"]) > 0, path, "the category list is empty")

    for category in data["categories"]:
        _require(isinstance(category, dict) and _is_int(category.get("id")) and "name" in category, path,
                 f"category {category!r} needs an integer 'id' and a 'name'")
    category_ids = [c["id"] for c in data["categories"]]
    duplicates = [i for i, n in collections.Counter(category_ids).items() if n > 1]
    _require(not duplicates, path, f"duplicate category ids {duplicates}")
    categories = CategoryMap.from_coco_categories(data["categories"])
    known_categories = set(category_ids)
    keypoint_schema = _keypoint_schema(data["categories"], path)
    keypoint_categories = set(keypoint_schema.category_ids) if keypoint_schema else set()

    images = []
    seen_ids = set()
    for image in data["images"]:
        _require(isinstance(image, dict) and _is_int(image.get("id")) and isinstance(image.get("file_name"), str),
                 path, f"image {image!r} needs an integer 'id' and a string 'file_name'")
        _require(image["id"] not in seen_ids, path, f"duplicate image id {image['id']}")
        for key in ("height", "width"):
            if key in image:
                _require(_is_int(image[key]) and image[key] > 0, path,
                         f"image {image['id']} has {key}={image[key]!r}, not a positive integer")
        seen_ids.add(image["id"])
        images.append(image)

    by_image: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for index, annotation in enumerate(data["annotations"]):
        _require(isinstance(annotation, dict), path, f"annotation #{index} is not an object")
        name = f"annotation {annotation.get('id', f'#{index}')}"
        _require(_is_int(annotation.get("image_id")), path, f"{name} has no integer 'image_id'")
        _require(annotation["image_id"] in seen_ids, path,
                 f"{name} refers to image id {annotation['image_id']}, which is not in 'images'")
        category_id = annotation.get("category_id")
        if category_id not in known_categories:
            raise CocoFormatError(
                f"{path}: {name} (image {annotation['image_id']}) has category_id {category_id!r}, which is "
                f"missing from the category list (ids {sorted(known_categories)})")
        if category_id not in keypoint_categories and _has_labelled_keypoints(annotation.get("keypoints")):
            raise CocoFormatError(
                f"{path}: {name} (image {annotation['image_id']}) has keypoints, but its category {category_id} "
                "names no keypoints: give the category a 'keypoints' list of names")
        bbox, area = annotation.get("bbox"), annotation.get("area")
        _require(bbox is None or (isinstance(bbox, list) and all(_is_number(v) for v in bbox)), path,
                 f"{name} (image {annotation['image_id']}) has bbox {bbox!r}, not a list of numbers")
        _require(area is None or _is_number(area), path,
                 f"{name} (image {annotation['image_id']}) has area {area!r}, not a number")
        _require(annotation.get("iscrowd", 0) in (0, 1), path,
                 f"{name} (image {annotation['image_id']}) has iscrowd {annotation.get('iscrowd')!r}, not 0 or 1")
        by_image[annotation["image_id"]].append(annotation)
    return CocoIndex(path, images, dict(by_image), categories, keypoint_schema)


def _keypoint_schema(categories: list[dict[str, Any]], path: str) -> KeypointSchema | None:
    """The one keypoint schema of the categories that name keypoints; CocoFormatError if they disagree."""
    schemas = []
    for category in sorted(categories, key=lambda c: c["id"]):
        names = category.get("keypoints")
        if not names:
            continue
        where = f"category {category['id']} ({category['name']})"
        _require(isinstance(names, list) and all(isinstance(n, str) for n in names), path,
                 f"{where}: 'keypoints' must be a list of names")
        skeleton = category.get("skeleton") or []
        _require(isinstance(skeleton, list) and all(
            isinstance(e, (list, tuple)) and len(e) == 2 and all(_is_int(i) and 1 <= i <= len(names) for i in e)
            for e in skeleton), path, f"{where}: 'skeleton' must be pairs of 1-based keypoint indices in "
                                      f"1..{len(names)}")
        sigmas = category.get("kpt_oks_sigmas")
        _require(sigmas is None or (isinstance(sigmas, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in sigmas)), path,
                 f"{where}: 'kpt_oks_sigmas' must be a list of numbers")
        try:
            schemas.append(KeypointSchema(
                names=tuple(names), skeleton=tuple((a - 1, b - 1) for a, b in skeleton),
                oks_sigmas=None if sigmas is None else tuple(float(v) for v in sigmas),
                category_ids=(category["id"],)))
        except ValueError as e:
            raise CocoFormatError(f"{path} is not a valid COCO keypoints file: {where}: {e}") from e
    if not schemas:
        return None
    first = schemas[0]
    for other in schemas[1:]:
        _require(dataclasses.replace(other, category_ids=first.category_ids) == first, path,
                 f"categories {first.category_ids[0]} and {other.category_ids[0]} name different keypoints, "
                 "skeletons or sigmas; one keypoint list must serve every category")
    return dataclasses.replace(first, category_ids=tuple(s.category_ids[0] for s in schemas))


def _has_labelled_keypoints(raw: Any) -> bool:
    """Whether a raw `keypoints` value says anything: absent, empty and all-zero lists say nothing."""
    if raw is None or raw == []:
        return False
    if not isinstance(raw, list):
        return True
    return any(v != 0 for v in raw)


# ----------------------------------------------------------------------------------------------------
# Images.


def image_path(images_dir: str, image: Mapping[str, Any], allow_outside: bool = False) -> str:
    """The file of a JSON image entry: its `file_name` joined to `images_dir`.

    CocoFormatError, naming the image id and file_name, when that resolves (os.path.realpath of both, so links
    are followed) outside `images_dir`: `../x.jpg`, an absolute path, or a link in the folder pointing out of it.
    `allow_outside=True` (data.allow_paths_outside_images_dir) returns such paths as they are.
    """
    file_name = image["file_name"]
    path = os.path.join(images_dir, file_name)
    if allow_outside:
        return path
    root = os.path.realpath(images_dir)
    try:
        target = os.path.realpath(path)
        inside = os.path.commonpath([root, target]) == root
    except ValueError as e:  # an embedded NUL byte (or, on Windows, another drive)
        target, inside = f"no path ({e})", False
    if not inside:
        raise CocoFormatError(
            f"image {image.get('id')!r} has file_name {file_name!r}, which resolves to {target}, outside its image "
            f"folder {root}; set data.allow_paths_outside_images_dir=True (--allow_paths_outside_images_dir with "
            "maskrcnn_jax.data.build) to read such paths")
    return path


class ImageTooLarge(ValueError):
    """An image whose header claims more pixels than the limit it is read with; it is not decoded."""


_PIL_LIMIT_LOCK = threading.Lock()


def _open_without_pils_limit(path: str) -> Image.Image:
    """Image.open with PIL's own size check (a DecompressionBombError past twice Image.MAX_IMAGE_PIXELS) lifted.
    That limit is process-global: it is lifted under a lock and put back at once. Opens through `open_image` that
    run meanwhile without the lock check their own limit whatever PIL's is."""
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


@contextlib.contextmanager
def open_image(path: str, max_pixels: int = PIL_MAX_PIXELS) -> Iterator[Image.Image]:
    """`with open_image(path, max_pixels) as image:` a PIL image whose header has been read (Image.open reads no
    more) and whose width x height is at most `max_pixels`, not yet decoded. ImageTooLarge (a ValueError)
    otherwise, before any pixel is decoded: a small file may claim a huge image.

    `max_pixels` is the one limit that decides: PIL's own (Image.MAX_IMAGE_PIXELS, whatever this process set it to)
    is lifted for the open when it is below `max_pixels`, and when PIL refuses a header the header is read again
    without it, so that the refusal is reported in these terms."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit is not None and max_pixels > 2 * pil_limit:
        image = _open_without_pils_limit(path)
    else:
        try:
            image = Image.open(path)
        except Image.DecompressionBombError:
            image = _open_without_pils_limit(path)
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"{path}: its header claims {width} x {height} = {width * height:,} pixels, more "
                                f"than max_image_pixels = {max_pixels:,}; it is not decoded")
        yield image


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    encoded: bytes  # JPEG or PNG of an upright 8-bit RGB image
    height: int
    width: int
    reencoded: bool  # False when the file's own bytes are kept


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit keeps its high byte (as tf.image.convert_image_dtype does), alpha is
    dropped, palettes and grayscale are expanded."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image).astype(np.int64)
        # Mode "I" also holds 8-bit data decoded as 32-bit; only values past 255 mean a 16-bit image.
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values >> 8
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_image(path: str, max_pixels: int = PIL_MAX_PIXELS) -> LoadedImage:
    """Reads an image fully (so a truncated file fails here, not in training) and returns upright RGB bytes.

    An 8-bit RGB JPEG or PNG without EXIF rotation keeps its own bytes; anything else (grayscale, RGBA,
    palette, 16-bit, CMYK, EXIF-rotated, other formats) is converted to 8-bit RGB, rotated upright and
    re-encoded as lossless PNG. Raises ImageSkipped('missing_image' | 'unreadable_image' | 'too_many_pixels'
    (the header claims more than `max_pixels` pixels; see `open_image`)) otherwise.
    """
    if not os.path.isfile(path):
        raise ImageSkipped("missing_image", f"no file {path}")
    try:
        with open_image(path, max_pixels) as image:
            image.load()
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
            if image.format in ("JPEG", "PNG") and image.mode == "RGB" and orientation == 1:
                with open(path, "rb") as f:
                    return LoadedImage(f.read(), image.height, image.width, reencoded=False)
            upright = to_rgb8(ImageOps.exif_transpose(image))
    except ImageTooLarge as e:
        raise ImageSkipped("too_many_pixels", str(e)) from e
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        # Pillow raises OSError for truncated data, UnidentifiedImageError for garbage, and
        # SyntaxError/ValueError from some format parsers on corrupt headers.
        raise ImageSkipped("unreadable_image", f"{path}: {e}") from e
    buffer = io.BytesIO()
    upright.save(buffer, format="PNG", compress_level=3)
    return LoadedImage(buffer.getvalue(), upright.height, upright.width, reencoded=True)


# ----------------------------------------------------------------------------------------------------
# Instances.


@dataclasses.dataclass(frozen=True)
class Instance:
    box: np.ndarray  # float32 [4], xyxy in pixels of the upright image, inside the image
    label: int  # contiguous 1..K
    category_id: int
    is_crowd: bool
    area: float  # the annotation's 'area' (COCO eval uses it for small/medium/large), else the mask's
    mask: np.ndarray  # uint8 [H, W] in {0, 1}
    keypoints: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), np.float32))  # [K, 3]
    keypoint_corrections: tuple[tuple[str, str], ...] = ()  # (reason, detail) of each change made to them

    @property
    def num_keypoints(self) -> int:
        """Labelled keypoints (v > 0)."""
        return int((self.keypoints[:, 2] > 0).sum())


class InstanceSkipped(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Polygons (list of flat [x, y, ...] lists), uncompressed RLE or compressed RLE -> uint8 [H, W] mask.

    Polygons with fewer than three points are dropped. Raises InstanceSkipped for what cannot be decoded.
    """
    try:
        return _decode_segmentation(segmentation, height, width)
    except (TypeError, ValueError, OverflowError) as e:  # numbers that are not, an RLE pycocotools refuses
        raise InstanceSkipped("invalid_segmentation", f"it cannot be decoded: {e}") from e


def _decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation
                    if isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            raise InstanceSkipped("invalid_segmentation", "no polygon with at least 3 points")
        rles = mask_utils.frPyObjects([[float(v) for v in p] for p in polygons], height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(s) for s in segmentation["size"]] != [height, width]:
            raise InstanceSkipped("invalid_segmentation",
                                  f"RLE size {segmentation['size']} differs from the image's {[height, width]}")
        if isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            counts = segmentation["counts"]
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise InstanceSkipped("invalid_segmentation", "segmentation is neither polygons nor RLE")
    return np.asarray(mask_utils.decode(rle), np.uint8)


def _mask_box(mask: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.asarray([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def parse_keypoints(raw: Any, num_keypoints: int, height: int, width: int, stated_count: Any = None
                    ) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """A raw `keypoints` value -> (float32 [K, 3] (x, y, v), [(correction reason, detail)]), by the rules in the
    module doc. Absent or empty means no labelled keypoint."""
    zeros = np.zeros((num_keypoints, 3), np.float32)
    if raw is None or raw == []:
        return zeros, []
    if not isinstance(raw, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
        return zeros, [("invalid_keypoints", "'keypoints' is not a list of numbers; its keypoints are dropped")]
    if len(raw) != 3 * num_keypoints:
        return zeros, [("invalid_keypoints", f"{len(raw)} keypoint values, not 3 x {num_keypoints}; its "
                                             "keypoints are dropped")]
    keypoints = np.asarray(raw, np.float64).reshape(num_keypoints, 3)
    if not np.isfinite(keypoints).all():
        return zeros, [("invalid_keypoints", "keypoints that are not finite; its keypoints are dropped")]
    visibility = keypoints[:, 2]
    if not np.isin(visibility, (0, 1, 2)).all():
        bad = sorted(set(visibility[~np.isin(visibility, (0, 1, 2))].tolist()))
        return zeros, [("invalid_keypoint_visibility", f"visibility {bad} outside {{0, 1, 2}}; its keypoints are "
                                                       "dropped")]
    corrections = []
    labelled = visibility > 0
    if stated_count is not None and stated_count != int(labelled.sum()):
        corrections.append(("num_keypoints_mismatch", f"num_keypoints is {stated_count} but {int(labelled.sum())} "
                                                      "keypoints are labelled; the labelled ones are counted"))
    positioned = ~labelled & (keypoints[:, :2] != 0).any(axis=1)
    if positioned.any():
        corrections.append(("position_without_visibility", f"keypoints {np.flatnonzero(positioned).tolist()} have "
                                                            "v = 0 but a position; it is zeroed"))
    x, y = keypoints[:, 0], keypoints[:, 1]
    outside = labelled & ((x < 0) | (x > width) | (y < 0) | (y > height))
    if outside.any():
        corrections.append(("keypoint_outside_image", f"keypoints {np.flatnonzero(outside).tolist()} lie outside "
                                                       f"the {width}x{height} image; they are dropped"))
    keypoints[~labelled | outside] = 0.0
    return keypoints.astype(np.float32), corrections


def parse_instance(annotation: Mapping[str, Any], categories: CategoryMap, height: int, width: int,
                   keypoint_schema: KeypointSchema | None = None) -> Instance:
    """One COCO annotation -> Instance, or InstanceSkipped with one of the reasons
    'missing_segmentation', 'invalid_segmentation', 'zero_area_mask', 'degenerate_box'.

    With a `keypoint_schema` the instance has keypoints [K, 3] (all zero for categories without keypoints)."""
    segmentation = annotation.get("segmentation")
    if not segmentation:
        raise InstanceSkipped("missing_segmentation", "the annotation has no segmentation")
    mask = decode_segmentation(segmentation, height, width)
    mask_area = int(mask.sum())
    if mask_area == 0:
        raise InstanceSkipped("zero_area_mask", "the segmentation covers no pixel")
    bbox = annotation.get("bbox")
    if bbox is not None and len(bbox) == 4:
        x, y, w, h = (float(v) for v in bbox)
        box = np.asarray([x, y, x + w, y + h], np.float32)
    else:
        box = _mask_box(mask)
    box = np.clip(box, 0.0, np.asarray([width, height, width, height], np.float32))
    if not (box[2] > box[0] and box[3] > box[1]):
        raise InstanceSkipped("degenerate_box", f"box {bbox} has no area inside the {width}x{height} image")
    area = float(annotation["area"]) if annotation.get("area") else float(mask_area)
    category_id = int(annotation["category_id"])
    num_keypoints = keypoint_schema.num_keypoints if keypoint_schema else 0
    keypoints, corrections = np.zeros((num_keypoints, 3), np.float32), []
    if keypoint_schema and category_id in keypoint_schema.category_ids:
        keypoints, corrections = parse_keypoints(annotation.get("keypoints"), num_keypoints, height, width,
                                                 annotation.get("num_keypoints"))
    return Instance(box=box, label=categories.label(category_id), category_id=category_id,
                    is_crowd=bool(annotation.get("iscrowd", 0)), area=area, mask=mask, keypoints=keypoints,
                    keypoint_corrections=tuple(corrections))


def encode_mask_png(mask: np.ndarray) -> bytes:
    """uint8 {0, 1} [H, W] mask -> single-channel PNG bytes (values stay 0/1)."""
    buffer = io.BytesIO()
    Image.fromarray(mask, "L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
