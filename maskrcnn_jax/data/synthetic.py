"""The built-in dataset: coloured shapes on textured backgrounds, written as a real COCO-format folder.

    python -m maskrcnn_jax.data.synthetic --out_dir=/tmp/shapes --num_train=2000 --num_val=200 --seed=0

writes
    {out_dir}/annotations/instances_train.json   {out_dir}/train/000001.jpg ...
    {out_dir}/annotations/instances_val.json     {out_dir}/val/000001.jpg ...

which the TFDS builder reads like any other COCO-format dataset (`shapes_data_paths` gives the four config
fields). Everything is a pure function of the seed and the arguments: image i of a split draws from
`np.random.default_rng([seed, split, i])`.

Five classes that differ by shape, not colour: circle, triangle, square, star and cross, 20-120 px across on
256-320 px images, in random colours with a shading gradient and noise. Backgrounds are random gratings plus
noise and a few thin distractor lines. Later shapes occlude earlier ones. Each annotation's polygons are its
*visible* part, computed exactly (polygons.subtract_shape) and clipped to the image; a placement that would
hide more than half of an earlier shape is redrawn. About 8 % of images have no shape at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from maskrcnn_jax.data import generated, polygons

CLASS_NAMES = ("circle", "triangle", "square", "star", "cross")
_SPLIT_NUMBER = {"train": 0, "val": 1}
_FORMAT_VERSION = 2  # bump when the drawing changes, so `generate` knows an old folder is stale


@dataclasses.dataclass(frozen=True)
class ShapesOptions:
    image_size_range: tuple[int, int] = (256, 320)  # height and width each drawn uniformly from this
    image_shape: tuple[int, int] | None = None  # a fixed (height, width) instead, e.g. (480, 640) COCO-like
    object_size_range: tuple[float, float] = (20.0, 120.0)  # shape diameter in pixels, log-uniform
    objects_per_image: tuple[int, int] = (1, 6)  # inclusive, for non-empty images
    empty_fraction: float = 0.08
    max_hidden_fraction: float = 0.5  # of an earlier shape's area that a later one may cover
    min_visible_area: float = 120.0  # px^2 that every annotated shape keeps
    jpeg_quality: int = 92


# ----------------------------------------------------------------------------------------------------
# Shapes as unions of convex parts (the outline is drawn, the parts are what occlusion subtracts).


def _regular_polygon(n: int, radius: float, phase: float) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.asarray([[c, s], [-s, c]])


def make_shape(class_name: str, radius: float, angle: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """(outline [N, 2], convex parts) of a shape centred at the origin with circumradius `radius`."""
    if class_name == "circle":
        outline = _regular_polygon(48, radius, 0.0)
        return outline, [outline]
    if class_name == "triangle":
        outline = _regular_polygon(3, radius, angle)
        return outline, [outline]
    if class_name == "square":
        outline = _regular_polygon(4, radius, angle)
        return outline, [outline]
    if class_name == "star":
        outer = _regular_polygon(5, radius, angle)
        inner = _regular_polygon(5, 0.45 * radius, angle + np.pi / 5)
        outline = np.stack([outer, inner], axis=1).reshape(-1, 2)
        tips = [np.stack([inner[i - 1], outer[i], inner[i]]) for i in range(5)]
        return outline, [inner] + tips
    if class_name == "cross":
        half_length, half_width = radius / np.sqrt(1 + 0.38 ** 2), 0.38 * radius / np.sqrt(1 + 0.38 ** 2)
        bar = np.asarray([[-half_length, -half_width], [half_length, -half_width],
                          [half_length, half_width], [-half_length, half_width]])
        horizontal, vertical = _rotate(bar, angle), _rotate(bar, angle + np.pi / 2)
        outline = np.asarray([(-half_width, -half_length), (half_width, -half_length), (half_width, -half_width),
                              (half_length, -half_width), (half_length, half_width), (half_width, half_width),
                              (half_width, half_length), (-half_width, half_length), (-half_width, half_width),
                              (-half_length, half_width), (-half_length, -half_width), (-half_width, -half_width)])
        return _rotate(outline, angle), [horizontal, vertical]
    raise ValueError(f"unknown shape {class_name!r}")


# ----------------------------------------------------------------------------------------------------
# Drawing.


def textured_background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [H, W, 3] gratings, noise and thin distractor lines, its base colour [3]); also used by
    stick_figures."""
    base = rng.uniform(40, 215, size=3)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.broadcast_to(base, (height, width, 3)).astype(np.float32).copy()
    for _ in range(2):
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(8, 80)
        amplitude = rng.uniform(5, 30, size=3)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / period + phase)
        image += wave[..., None] * amplitude
    image += rng.uniform(3, 10) * rng.standard_normal(image.shape, dtype=np.float32)
    # Thin distractor lines: edges that belong to no object.
    for _ in range(rng.integers(0, 4)):
        x0, y0, x1, y1 = rng.uniform(0, 1, 4) * [width, height, width, height]
        length = max(abs(x1 - x0), abs(y1 - y0), 1.0)
        t = np.linspace(0, 1, int(length) * 2)
        xs = np.clip((x0 + t * (x1 - x0)).astype(int), 0, width - 1)
        ys = np.clip((y0 + t * (y1 - y0)).astype(int), 0, height - 1)
        image[ys, xs] = rng.uniform(0, 255, size=3)
    return image, base


def distinct_colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A random RGB colour far from `avoid` (the background's base colour)."""
    for _ in range(50):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - avoid) > 90:
            return colour
    return 255.0 - avoid


def _rasterize(pieces: list[np.ndarray], height: int, width: int) -> np.ndarray:
    if not pieces:
        return np.zeros((height, width), np.uint8)
    rles = mask_utils.frPyObjects([p.reshape(-1).tolist() for p in pieces], height, width)
    return mask_utils.decode(mask_utils.merge(rles))


@dataclasses.dataclass
class _Placed:
    class_index: int
    outline: np.ndarray  # clipped to the image
    parts: list[np.ndarray]
    visible: list[np.ndarray]  # pieces of the outline not covered by later shapes
    full_area: float


def draw_image(rng: np.random.Generator, options: ShapesOptions):
    """-> (uint8 image [H, W, 3], list of annotations {class_index, polygons, bbox xywh, area})."""
    height, width = (int(v) for v in rng.integers(options.image_size_range[0], options.image_size_range[1] + 1,
                                                  size=2))
    if options.image_shape is not None:
        height, width = options.image_shape
    image, background_colour = textured_background(rng, height, width)
    frame = np.asarray([[0, 0], [width, 0], [width, height], [0, height]], np.float64)
    count = 0 if rng.uniform() < options.empty_fraction else int(rng.integers(options.objects_per_image[0],
                                                                              options.objects_per_image[1] + 1))
    placed: list[_Placed] = []
    for _ in range(count):
        for _attempt in range(30):
            class_index = int(rng.integers(len(CLASS_NAMES)))
            diameter = float(np.exp(rng.uniform(*np.log(options.object_size_range))))
            outline, parts = make_shape(CLASS_NAMES[class_index], diameter / 2, rng.uniform(0, 2 * np.pi))
            centre = rng.uniform([0.05 * width, 0.05 * height], [0.95 * width, 0.95 * height])
            outline, parts = outline + centre, [p + centre for p in parts]
            clipped = polygons.clip_to_convex(outline, frame)
            if len(clipped) < 3 or polygons.polygon_area(clipped) < max(options.min_visible_area,
                                                                        0.6 * polygons.polygon_area(outline)):
                continue
            occluded = [polygons.subtract_shape(p.visible, parts) for p in placed]
            if all(sum(map(polygons.polygon_area, v)) >= max(options.min_visible_area,
                                                              (1 - options.max_hidden_fraction) * p.full_area)
                   for p, v in zip(placed, occluded)):
                for p, v in zip(placed, occluded):
                    p.visible = v
                placed.append(_Placed(class_index, clipped, parts, [clipped], polygons.polygon_area(clipped)))
                break

    for shape in placed:
        ys, xs = np.nonzero(_rasterize([shape.outline], height, width))
        colour = distinct_colour(rng, background_colour)
        # A shading gradient and a little noise so a shape is not one flat colour.
        theta = rng.uniform(0, 2 * np.pi)
        gradient = ((xs + 0.5) * np.cos(theta) + (ys + 0.5) * np.sin(theta)) / max(height, width)
        fill = colour + rng.uniform(-40, 40) * gradient[:, None]
        image[ys, xs] = fill + 4.0 * rng.standard_normal((len(xs), 3), dtype=np.float32)

    annotations = []
    for shape in placed:
        # Rounded as written to the JSON, so area and box describe exactly what a reader decodes.
        pieces = [np.round(p, 2) for p in shape.visible if len(p) >= 3]
        rle = mask_utils.merge(mask_utils.frPyObjects([p.reshape(-1).tolist() for p in pieces], height, width))
        area = float(mask_utils.area(rle))
        if area < 1:
            continue
        corners = np.concatenate(pieces)
        x1, y1 = corners.min(axis=0)
        x2, y2 = corners.max(axis=0)
        annotations.append({
            "class_index": shape.class_index,
            "polygons": [[float(v) for v in p.reshape(-1)] for p in pieces],
            "bbox": [float(x1), float(y1), round(float(x2 - x1), 2), round(float(y2 - y1), 2)],
            "area": area,
        })
    return np.clip(image, 0, 255).astype(np.uint8), annotations


# ----------------------------------------------------------------------------------------------------
# Writing the COCO folder.


def _info(split: str, num_images: int, seed: int, options: ShapesOptions) -> dict[str, Any]:
    return {"description": "maskrcnn_jax synthetic shapes", "split": split, "num_images": num_images,
            "seed": seed, "format_version": _FORMAT_VERSION, "options": dataclasses.asdict(options)}


def shapes_data_paths(out_dir: str) -> dict[str, str]:
    """The four data-config fields for a folder written by `generate`."""
    return generated.data_paths(out_dir, "instances")


def write_split(out_dir: str, split: str, num_images: int, seed: int, options: ShapesOptions) -> str:
    """Draws `num_images` images and writes them with their annotation JSON; returns the JSON path."""

    def draw(index):
        pixels, shapes = draw_image(np.random.default_rng([seed, _SPLIT_NUMBER[split], index]), options)
        return pixels, [{"category_id": shape["class_index"] + 1, "segmentation": shape["polygons"],
                         "bbox": shape["bbox"], "area": shape["area"], "iscrowd": 0} for shape in shapes]

    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASS_NAMES)]
    return generated.write_split(out_dir, split, shapes_data_paths(out_dir)[f"{split}_json"], num_images, draw,
                                 options.jpeg_quality, _info(split, num_images, seed, options), categories)


def generate(out_dir: str, num_train: int, num_val: int, seed: int = 0,
             options: ShapesOptions = ShapesOptions()) -> dict[str, str]:
    """Writes both splits unless `out_dir` already holds them for the same arguments; returns the paths
    (train_json, train_images, val_json, val_images)."""
    return generated.generate_splits(shapes_data_paths(out_dir), {"train": num_train, "val": num_val},
                                     lambda split, n: _info(split, n, seed, options),
                                     lambda split, n: write_split(out_dir, split, n, seed, options))


if __name__ == "__main__":
    generated.command_line(generate, "dataset")
