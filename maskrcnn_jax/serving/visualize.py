"""Overlay PNGs: predicted masks, boxes and labels drawn on the original validation images."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from maskrcnn_jax.data.coco_format import CategoryMap

MASK_OPACITY = 0.5


def colour(label: int) -> tuple[int, int, int]:
    """A fixed, well-separated colour per label (golden-ratio hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """The mask's own pixels that touch a pixel outside it (4-neighbourhood; the image border counts as outside)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def draw_overlay(image: np.ndarray, detections: Mapping[str, np.ndarray], categories: CategoryMap | None,
                 score_threshold: float = 0.5, colour_by_instance: bool = False) -> Image.Image:
    """image uint8 [h, w, 3]; detections in original pixels: boxes [N, 4] xyxy, scores [N], labels [N] 1..K (or
    `names` [N] when categories is None), masks [N, h, w] bool. Each mask is tinted and outlined, each box drawn
    with its class name and score, in a colour per label (or per instance). Detections below `score_threshold` are
    left out."""
    pixels = np.asarray(image, np.float32).copy()
    keep = np.flatnonzero(np.asarray(detections["scores"]) >= score_threshold)
    if categories is None:
        names = [detections["names"][i] for i in keep]
    else:
        names = [categories.name(int(detections["labels"][i])) for i in keep]
    colours = [colour(n + 1 if colour_by_instance else int(detections["labels"][i])) for n, i in enumerate(keep)]
    for i, rgb in zip(keep, colours):
        mask = np.asarray(detections["masks"][i], bool)
        pixels[mask] = (1 - MASK_OPACITY) * pixels[mask] + MASK_OPACITY * np.asarray(rgb)
        pixels[mask_outline(mask)] = rgb
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for i, name, rgb in zip(keep, names, colours):
        x1, y1, x2, y2 = (float(v) for v in detections["boxes"][i])
        draw.rectangle([x1, y1, x2, y2], outline=rgb, width=2)
        draw.text((x1 + 2, max(y1 - 11, 0)), f"{name} {float(detections['scores'][i]):.2f}", fill=(255, 255, 255))
    return canvas


def write_overlays(out_dir: str, overlays: Sequence[tuple[int, Mapping[str, np.ndarray]]], coco_gt,
                   images_dir: str, categories: CategoryMap, score_threshold: float = 0.5) -> list[str]:
    """One PNG per (image_id, detections), reading the original image via the ground truth's file_name."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for image_id, detections in overlays:
        entry = coco_gt.imgs[image_id]
        with Image.open(os.path.join(images_dir, entry["file_name"])) as original:
            image = np.asarray(original.convert("RGB"))
        path = os.path.join(out_dir, f"{image_id}.png")
        draw_overlay(image, detections, categories, score_threshold).save(path)
        paths.append(path)
    return paths
