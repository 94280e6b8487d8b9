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


def draw_overlay(image: np.ndarray, detections: Mapping[str, np.ndarray], categories: CategoryMap,
                 score_threshold: float = 0.5) -> Image.Image:
    """image uint8 [h, w, 3]; detections in original pixels: boxes [N, 4] xyxy, scores [N], labels [N] 1..K,
    masks [N, h, w] bool. Detections below `score_threshold` are left out."""
    pixels = np.asarray(image, np.float32).copy()
    keep = np.asarray(detections["scores"]) >= score_threshold
    boxes = np.asarray(detections["boxes"])[keep]
    scores = np.asarray(detections["scores"])[keep]
    labels = np.asarray(detections["labels"])[keep]
    masks = np.asarray(detections["masks"])[keep]
    for mask, label in zip(masks, labels):
        pixels[mask] = (1 - MASK_OPACITY) * pixels[mask] + MASK_OPACITY * np.asarray(colour(int(label)))
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for box, score, label in zip(boxes, scores, labels):
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour(int(label)), width=2)
        draw.text((x1 + 2, max(y1 - 11, 0)), f"{categories.name(int(label))} {score:.2f}", fill=(255, 255, 255))
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
