"""What the generated datasets (synthetic.py's shapes, stick_figures.py's people) share: writing a split's COCO JSON
so that its presence means the split is complete, regenerating only the splits whose arguments changed, and the
command line that writes one."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from PIL import Image


def data_paths(out_dir: str, json_stem: str) -> dict[str, str]:
    """The four data-config fields of a generated folder: annotations/{json_stem}_{split}.json and {split}/."""
    return {"train_json": os.path.join(out_dir, "annotations", f"{json_stem}_train.json"),
            "train_images": os.path.join(out_dir, "train"),
            "val_json": os.path.join(out_dir, "annotations", f"{json_stem}_val.json"),
            "val_images": os.path.join(out_dir, "val")}


def write_split(out_dir: str, split: str, json_path: str, num_images: int,
                draw: Callable[[int], tuple[np.ndarray, Iterable[Mapping[str, Any]]]], jpeg_quality: int,
                info: Any, categories: list[Mapping[str, Any]]) -> str:
    """Draws images 0..num_images-1 (draw(index) -> (uint8 pixels, annotations without ids)), saves them as
    JPEGs in out_dir/split, and writes their COCO JSON; returns its path."""
    images_dir = os.path.join(out_dir, split)
    os.makedirs(images_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        pixels, objects = draw(index)
        image_id = index + 1
        file_name = f"{image_id:06d}.jpg"
        Image.fromarray(pixels).save(os.path.join(images_dir, file_name), quality=jpeg_quality)
        images.append({"id": image_id, "file_name": file_name, "height": pixels.shape[0], "width": pixels.shape[1]})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj})
    coco = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    return write_coco_json(json_path, coco)


def write_coco_json(json_path: str, coco: Mapping[str, Any]) -> str:
    """Writes the JSON through a temporary file: it appears last, so its presence means the split is complete."""
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    temporary = json_path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(coco, f)
    os.replace(temporary, json_path)
    return json_path


def generate_splits(paths: Mapping[str, str], num_images: Mapping[str, int], info: Callable[[str, int], Any],
                    write_split: Callable[[str, int], Any]) -> dict[str, str]:
    """Calls write_split(split, n) for "train" and "val" unless the split's JSON (paths[f"{split}_json"]) already
    records info(split, n), i.e. was written with the same arguments. Returns the paths."""
    for split in ("train", "val"):
        json_path = paths[f"{split}_json"]
        if os.path.isfile(json_path):
            with open(json_path) as f:
                if json.load(f).get("info") == json.loads(json.dumps(info(split, num_images[split]))):
                    continue
        write_split(split, num_images[split])
    return dict(paths)


def command_line(generate: Callable[..., Mapping[str, str]], what: str) -> None:
    """`python -m <module> --out_dir=DIR [--num_train --num_val --seed]`: writes the dataset, prints its paths."""
    from absl import app, flags

    flags.DEFINE_string("out_dir", None, f"Folder to write the COCO-format {what} into.", required=True)
    flags.DEFINE_integer("num_train", 2000, "Training images.")
    flags.DEFINE_integer("num_val", 200, "Validation images.")
    flags.DEFINE_integer("seed", 0, "Everything drawn follows from this seed.")

    def main(argv):
        del argv
        values = flags.FLAGS
        for key, path in generate(values.out_dir, values.num_train, values.num_val, values.seed).items():
            print(f"{key}: {path}")

    app.run(main)
