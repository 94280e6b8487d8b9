"""`maskrcnn-predict`: run a workdir's model on image files, write overlays and a COCO results JSON.

    maskrcnn-predict --workdir=workdir/shapes_demo photos/*.jpg --out=predictions [--score-threshold=0.5]
                     [--polygons] [--batch-size=1] [--max-image-pixels=178956970]
                     [--compilation-cache-dir=~/.cache/maskrcnn_jax/jax]

Writes into OUT:
    <name>.png      each image with its detections: a colour per instance, mask tint and outline, box, class, score
    results.json    COCO results (image_id, category_id, bbox xywh, score, segmentation as RLE; with --polygons
                    also "polygons", lists of x, y, x, y, ... in pixel coordinates)
    images.json     {"images": [{id, file_name, height, width}], "categories": [...]}: the image ids results.json
                    uses, so that pycocotools' COCO(images.json).loadRes(results.json) works. Its file_names are
                    absolute paths: a dataset built from it needs data.allow_paths_outside_images_dir=True
Files that cannot be read are reported and skipped, and so are images whose header claims more than
--max-image-pixels pixels (not decoded: a small file may claim a huge image); the rest go on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import ImageOps, UnidentifiedImageError

from maskrcnn_jax.data.options import PIL_MAX_PIXELS
from maskrcnn_jax.evaluation import coco


def read_image(path: str, max_pixels: int = PIL_MAX_PIXELS) -> np.ndarray:
    """Upright (EXIF orientation applied) uint8 RGB of any image file Pillow reads, gray, RGBA and 16-bit
    included. OSError / ValueError for files it cannot read; coco_format.ImageTooLarge (a ValueError), before
    decoding, for one whose header claims more than `max_pixels` pixels."""
    from maskrcnn_jax.data.coco_format import open_image, to_rgb8

    with open_image(path, max_pixels) as image:
        image.load()
        return np.asarray(to_rgb8(ImageOps.exif_transpose(image)))


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer and inner boundaries of a bool mask as COCO polygons [x1, y1, x2, y2, ...] in continuous pixel
    coordinates: the 0.5 level of the zero-padded mask, which runs along pixel edges."""
    import contourpy

    padded = np.pad(mask.astype(np.float64), 1)
    lines = contourpy.contour_generator(z=padded, line_type="Separate").lines(0.5)
    # Index (i, j) of the padded grid is the centre of pixel (i - 1, j - 1), i.e. continuous coordinate i - 0.5.
    return [(line - 0.5).ravel().round(2).tolist() for line in lines if len(line) >= 3]


def _output_names(paths: Sequence[str]) -> list[str]:
    """One overlay name per input: its stem, with a numeric suffix where two inputs share a stem."""
    names, seen = [], {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def predict_files(predictor, paths: Sequence[str], out_dir: str, score_threshold: float = 0.5,
                  polygons: bool = False, progress: bool = True, max_pixels: int = PIL_MAX_PIXELS) -> dict[str, Any]:
    """Runs `predictor` over `paths` and writes OUT (see the module doc). Returns {'images', 'detections',
    'unreadable': [(path, reason)]}: the files skipped, unreadable or claiming more than `max_pixels` pixels."""
    from tqdm import tqdm

    from maskrcnn_jax.serving import visualize

    os.makedirs(out_dir, exist_ok=True)
    names = _output_names(paths)
    loaded: list[tuple[int, str, str, np.ndarray]] = []  # (image id, path, overlay name, pixels) in feed order
    unreadable: list[tuple[str, str]] = []
    bar = tqdm(total=len(paths), unit="image", disable=not progress)

    def readable_images() -> Iterator[np.ndarray]:
        for image_id, (path, name) in enumerate(zip(paths, names), start=1):
            try:
                pixels = read_image(path, max_pixels)
            except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as e:
                unreadable.append((path, str(e)))
                bar.write(f"skipping {path}: {e}", file=sys.stderr)
                bar.update(1)
                continue
            loaded.append((image_id, path, name, pixels))
            yield pixels

    results, images = [], []
    category_ids = predictor.spec.category_ids
    done = 0
    for result in predictor.predict_iter(readable_images(), score_threshold):
        image_id, path, name, pixels = loaded[done]
        loaded[done] = None  # the pixels are no longer needed
        done += 1
        images.append({"id": image_id, "file_name": os.path.abspath(path), "height": int(pixels.shape[0]),
                       "width": int(pixels.shape[1])})
        overlay = visualize.draw_overlay(pixels, result, score_threshold, colour_by_instance=True,
                                         skeleton=predictor.spec.keypoint_skeleton)
        overlay.save(os.path.join(out_dir, f"{name}.png"))
        count = len(result["scores"])
        rles = coco.encode_masks(result["masks"]) if "masks" in result else [None] * count
        for k, rle in enumerate(rles):
            entry = coco.coco_result(image_id, result["labels"][k], result["boxes"][k], result["scores"][k], rle,
                                     result["keypoints"][k] if "keypoints" in result else None)
            if polygons and rle is not None:
                entry["polygons"] = mask_polygons(result["masks"][k])
            results.append(entry)
        bar.update(1)
    bar.close()
    categories = [{"id": int(c), "name": n} for c, n in zip(category_ids, predictor.spec.names)]
    if predictor.spec.keypoint_names:  # what COCO's loadRes of keypoint results reads
        for category in categories:
            category["keypoints"] = list(predictor.spec.keypoint_names)
            category["skeleton"] = [[a + 1, b + 1] for a, b in predictor.spec.keypoint_skeleton]
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f)
    with open(os.path.join(out_dir, "images.json"), "w") as f:
        json.dump({"images": images, "categories": categories, "annotations": []}, f)
    return {"images": len(images), "detections": len(results), "unreadable": unreadable}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="maskrcnn-predict", description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--workdir", required=True, help="training or import workdir (best, else latest checkpoint)")
    parser.add_argument("--out", required=True, help="directory for the overlays and JSON files")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring at least this")
    parser.add_argument("--polygons", action="store_true", help="also write mask polygons into results.json")
    parser.add_argument("--batch-size", type=int, default=1, help="images per network call")
    parser.add_argument("--max-image-pixels", type=int, default=PIL_MAX_PIXELS,
                        help="skip, undecoded, images whose header claims more pixels (width x height) than this "
                             "(default: %(default)s, PIL's own hard stop)")
    parser.add_argument("--compilation-cache-dir", default=None,
                        help="keep compiled executables here, so that the next run on the same canvas does not "
                             "compile again (default: the user's cache directory, ~/.cache/maskrcnn_jax/jax; '' "
                             "turns it off)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from maskrcnn_jax.data.devices import hide_accelerators_from_tensorflow
    from maskrcnn_jax.engine import compilation_cache
    from maskrcnn_jax.serving.predictor import Predictor

    hide_accelerators_from_tensorflow()
    compilation_cache.enable(args.compilation_cache_dir)  # before anything compiles
    predictor = Predictor.from_checkpoint(args.workdir, batch_size=args.batch_size)
    summary = predict_files(predictor, args.images, args.out, args.score_threshold, args.polygons,
                            max_pixels=args.max_image_pixels)
    print(f"{summary['images']} images, {summary['detections']} detections written to {args.out}"
          + (f"; {len(summary['unreadable'])} unreadable or oversized files skipped" if summary["unreadable"] else ""))
    return 1 if summary["images"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
