"""Overlay PNGs: predicted masks, boxes and labels drawn on the original validation images."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

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


def draw_overlay(image: np.ndarray, detections: Mapping[str, Any], score_threshold: float = 0.5,
                 colour_by_instance: bool = False, skeleton: Sequence[Sequence[int]] = ()) -> Image.Image:
    """image uint8 [h, w, 3]; detections in original pixels, as the Predictor returns them: boxes [N, 4] xyxy,
    scores [N], labels [N] (category ids), names [N], and masks [N, h, w] bool and keypoints [N, K, 3] when the
    model predicts them. Each mask is tinted and outlined, each box drawn with its class name and score, and each
    skeleton edge (0-based keypoint pairs) and keypoint drawn, in a colour per label (or per instance). Detections
    below `score_threshold` are left out."""
    pixels = np.asarray(image, np.float32).copy()
    keep = np.flatnonzero(np.asarray(detections["scores"]) >= score_threshold)
    colours = [colour(n + 1 if colour_by_instance else int(detections["labels"][i])) for n, i in enumerate(keep)]
    if "masks" in detections:
        for i, rgb in zip(keep, colours):
            mask = np.asarray(detections["masks"][i], bool)
            pixels[mask] = (1 - MASK_OPACITY) * pixels[mask] + MASK_OPACITY * np.asarray(rgb)
            pixels[mask_outline(mask)] = rgb
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for i, rgb in zip(keep, colours):
        x1, y1, x2, y2 = (float(v) for v in detections["boxes"][i])
        draw.rectangle([x1, y1, x2, y2], outline=rgb, width=2)
        draw.text((x1 + 2, max(y1 - 11, 0)), f"{detections['names'][i]} {float(detections['scores'][i]):.2f}",
                  fill=(255, 255, 255))
        if "keypoints" in detections:
            points = np.asarray(detections["keypoints"][i], np.float64)[:, :2]
            for a, b in skeleton:
                draw.line([tuple(points[a]), tuple(points[b])], fill=rgb, width=2)
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(255, 255, 255), outline=rgb)
    return canvas


def write_overlays(out_dir: str, overlays: Sequence[tuple[int, Mapping[str, Any]]], coco_gt, images_dir: str,
                   score_threshold: float = 0.5, skeleton: Sequence[Sequence[int]] = ()) -> list[str]:
    """One PNG per (image_id, detections), reading the original image via the ground truth's file_name (upright,
    as the dataset was built: EXIF orientation applied)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for image_id, detections in overlays:
        entry = coco_gt.imgs[image_id]
        with Image.open(os.path.join(images_dir, entry["file_name"])) as original:
            image = np.asarray(ImageOps.exif_transpose(original).convert("RGB"))
        path = os.path.join(out_dir, f"{image_id}.png")
        draw_overlay(image, detections, score_threshold, skeleton=skeleton).save(path)
        paths.append(path)
    return paths
