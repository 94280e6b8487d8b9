"""A generated keypoint dataset: articulated stick figures on textured backgrounds, as a real COCO keypoints folder.

    python -m maskrcnn_jax.data.stick_figures --out_dir=/tmp/figures --num_train=2000 --num_val=200 --seed=0

writes
    {out_dir}/annotations/keypoints_train.json   {out_dir}/train/000001.jpg ...
    {out_dir}/annotations/keypoints_val.json     {out_dir}/val/000001.jpg ...

which the TFDS builder reads like COCO's person_keypoints files (`stick_figures_data_paths` gives the four data
config fields). Everything is a pure function of the seed and the arguments: image i of a split draws from
`np.random.default_rng([seed, split, i])`.

One category, "figure", with the 13 joints of `JOINT_NAMES` (COCO's limb joint names plus a head), its
`skeleton` (1-based, as COCO) and, under the category's extra key "kpt_oks_sigmas" (pycocotools' name for
them), the OKS sigmas `OKS_SIGMAS`. Figures face the viewer, so a figure's left side is the image's right
when it stands upright: left and right are told apart by the body's orientation, as in photographs.

Each figure is 60-180 px tall on 256-320 px images, drawn as thick limbs, a torso and a head in one colour with
shading and noise, in a random pose, lean and size. Later figures occlude earlier ones; a placement that would
hide more than half of an earlier figure or leave it fewer than 4 visible joints is redrawn. Annotations:
  segmentation  compressed RLE of the visible pixels; area = its pixel count; bbox = its tight box
  keypoints     (x, y, v) per joint: v = 2 visible, 1 hidden behind a later figure, and (0, 0, 0) outside the image
  num_keypoints the joints with v > 0
About 15 % of images hold a crowd: a cluster of small figures behind the others, annotated as one iscrowd=1 RLE
region without keypoints. About 8 % of images hold nothing at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from maskrcnn_jax.data import generated
from maskrcnn_jax.data.synthetic import distinct_colour, textured_background

CATEGORY_NAME = "figure"
JOINT_NAMES = ("head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
               "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
SKELETON = (("head", "left_shoulder"), ("head", "right_shoulder"), ("left_shoulder", "right_shoulder"),
            ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
            ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"),
            ("left_shoulder", "left_hip"), ("right_shoulder", "right_hip"), ("left_hip", "right_hip"),
            ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
            ("right_hip", "right_knee"), ("right_knee", "right_ankle"))
# COCO's sigmas for the limb joints (a stick figure's area relative to its height is close to a person's, so
# the same tolerances fit); the head is a large disk whose centre is less sharply defined than a nose.
OKS_SIGMAS = (0.05, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089)
_JOINT = {name: i for i, name in enumerate(JOINT_NAMES)}
_SPLIT_NUMBER = {"train": 0, "val": 1}
_FORMAT_VERSION = 1  # bump when the drawing changes, so `generate` knows an old folder is stale


@dataclasses.dataclass(frozen=True)
class StickFigureOptions:
    image_size_range: tuple[int, int] = (256, 320)  # height and width each drawn uniformly from this
    figure_height_range: tuple[float, float] = (60.0, 180.0)  # standing height in pixels, log-uniform
    figures_per_image: tuple[int, int] = (1, 4)  # inclusive, for non-empty images
    empty_fraction: float = 0.08
    crowd_fraction: float = 0.15  # of non-empty images
    crowd_size: tuple[int, int] = (5, 9)  # small figures per crowd, inclusive
    crowd_figure_height_range: tuple[float, float] = (25.0, 45.0)
    max_hidden_fraction: float = 0.5  # of an earlier figure's pixels that later ones may cover
    min_visible_joints: int = 4  # v = 2 joints every annotated figure keeps
    min_joints_in_image: int = 8
    jpeg_quality: int = 92


# ----------------------------------------------------------------------------------------------------
# A figure: joints from a pose, and the convex parts that draw it.

# Body frame: unit = standing height, y down, the figure's left towards +x (it faces the viewer).
_HEAD_RADIUS = 0.085
_SHOULDER = (0.11, 0.23)  # (half width, height below the top of the head)
_HIP = (0.07, 0.52)
_UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.16, 0.15, 0.23, 0.23


def _direction(angle: float, side: float) -> np.ndarray:
    """Unit vector `angle` radians from straight down, turning outward on `side` (+1 left, -1 right)."""
    return np.asarray([side * np.sin(angle), np.cos(angle)])


def pose_joints(rng: np.random.Generator) -> np.ndarray:
    """[13, 2] joints of a random pose in the body frame."""
    joints = np.zeros((len(JOINT_NAMES), 2))
    joints[_JOINT["head"]] = (0.0, _HEAD_RADIUS)
    for side, prefix in ((1.0, "left_"), (-1.0, "right_")):
        shoulder = np.asarray([side * _SHOULDER[0], _SHOULDER[1]])
        hip = np.asarray([side * _HIP[0], _HIP[1]])
        upper_arm = rng.uniform(np.radians(-30), np.radians(170))
        forearm = upper_arm + rng.uniform(np.radians(-140), np.radians(140))
        thigh = rng.uniform(np.radians(-20), np.radians(65))
        shin = thigh + rng.uniform(np.radians(-70), np.radians(70))
        elbow = shoulder + _UPPER_ARM * _direction(upper_arm, side)
        knee = hip + _THIGH * _direction(thigh, side)
        joints[_JOINT[prefix + "shoulder"]] = shoulder
        joints[_JOINT[prefix + "elbow"]] = elbow
        joints[_JOINT[prefix + "wrist"]] = elbow + _FOREARM * _direction(forearm, side)
        joints[_JOINT[prefix + "hip"]] = hip
        joints[_JOINT[prefix + "knee"]] = knee
        joints[_JOINT[prefix + "ankle"]] = knee + _SHIN * _direction(shin, side)
    return joints


def _capsule(p: np.ndarray, q: np.ndarray, radius: float, points_per_cap: int = 8) -> np.ndarray:
    """Convex polygon of the segment p-q thickened by `radius`, with round caps."""
    along = np.arctan2(q[1] - p[1], q[0] - p[0])
    cap = np.linspace(-np.pi / 2, np.pi / 2, points_per_cap)
    around_q = q + radius * np.stack([np.cos(along + cap), np.sin(along + cap)], axis=1)
    around_p = p + radius * np.stack([np.cos(along + np.pi + cap), np.sin(along + np.pi + cap)], axis=1)
    return np.concatenate([around_q, around_p])


def _disk(centre: np.ndarray, radius: float, points: int = 24) -> np.ndarray:
    angles = 2 * np.pi * np.arange(points) / points
    return centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def figure_parts(joints: np.ndarray, height: float, limb_radius: float) -> list[np.ndarray]:
    """Convex polygons (image pixels) whose union is the figure with these image-space joints."""
    j = {name: joints[i] for i, name in enumerate(JOINT_NAMES)}
    radius = limb_radius * height
    shoulders_mid = (j["left_shoulder"] + j["right_shoulder"]) / 2
    parts = [_disk(j["head"], _HEAD_RADIUS * height), _capsule(j["head"], shoulders_mid, radius),
             np.stack([j["left_shoulder"], j["right_shoulder"], j["right_hip"], j["left_hip"]])]
    parts += [_capsule(j[a], j[b], radius) for a, b in SKELETON if "head" not in (a, b)]
    return parts


def _rasterize(parts: list[np.ndarray], height: int, width: int) -> np.ndarray:
    rles = mask_utils.frPyObjects([p.reshape(-1).tolist() for p in parts], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


@dataclasses.dataclass
class _Placed:
    full: np.ndarray  # bool [H, W]: every pixel the figure (or crowd) covers
    joints: np.ndarray | None  # [13, 2] rounded image coordinates; None for a crowd
    visible: np.ndarray  # bool [H, W]: what later figures leave of `full`


def _random_figure(rng: np.random.Generator, image_h: int, image_w: int, height_range: tuple[float, float],
                   centre_box: tuple[float, float, float, float]):
    """(joints [13, 2] in image pixels rounded as written, full mask) of one figure at a random place."""
    height = float(np.exp(rng.uniform(*np.log(height_range))))
    lean = rng.uniform(-np.pi, np.pi) if rng.uniform() < 0.1 else float(np.clip(rng.normal(0, 0.3), -0.8, 0.8))
    rotation = np.asarray([[np.cos(lean), -np.sin(lean)], [np.sin(lean), np.cos(lean)]])
    body = pose_joints(rng)
    body -= body[[_JOINT["left_hip"], _JOINT["right_hip"], _JOINT["left_shoulder"], _JOINT["right_shoulder"]]].mean(0)
    centre = rng.uniform(centre_box[:2], centre_box[2:])
    joints = np.round(centre + height * body @ rotation.T, 2)
    limb_radius = rng.uniform(0.025, 0.04)
    return joints, _rasterize(figure_parts(joints, height, limb_radius), image_h, image_w)


def _joints_in_image(joints: np.ndarray, image_h: int, image_w: int) -> np.ndarray:
    return (joints[:, 0] >= 0) & (joints[:, 0] < image_w) & (joints[:, 1] >= 0) & (joints[:, 1] < image_h)


def _visible_joints(placed: _Placed, image_h: int, image_w: int) -> np.ndarray:
    """bool [13]: inside the image and on a pixel of the figure that no later figure covers."""
    inside = _joints_in_image(placed.joints, image_h, image_w)
    cols = np.clip(np.floor(placed.joints[:, 0]).astype(int), 0, image_w - 1)
    rows = np.clip(np.floor(placed.joints[:, 1]).astype(int), 0, image_h - 1)
    return inside & placed.visible[rows, cols]


def _fits(placed: list[_Placed], new_full: np.ndarray, options: StickFigureOptions, image_h: int,
          image_w: int) -> bool:
    """Whether every earlier figure keeps enough of itself when `new_full` is drawn over it."""
    for p in placed:
        visible = p.visible & ~new_full
        if visible.sum() < (1 - options.max_hidden_fraction) * p.full.sum():
            return False
        if p.joints is not None:
            covered = _Placed(p.full, p.joints, visible)
            if _visible_joints(covered, image_h, image_w).sum() < options.min_visible_joints:
                return False
    return True


def _place(placed: list[_Placed], full: np.ndarray, joints: np.ndarray | None) -> None:
    for p in placed:
        p.visible &= ~full
    placed.append(_Placed(full, joints, full.copy()))


def _crowd(rng: np.random.Generator, image_h: int, image_w: int, options: StickFigureOptions) -> np.ndarray:
    """Full mask of a cluster of small overlapping figures."""
    centre = rng.uniform([0.2 * image_w, 0.2 * image_h], [0.8 * image_w, 0.8 * image_h])
    spread = rng.uniform(25, 60)
    full = np.zeros((image_h, image_w), bool)
    for _ in range(int(rng.integers(options.crowd_size[0], options.crowd_size[1] + 1))):
        box = (*(centre - spread), *(centre + spread))
        full |= _random_figure(rng, image_h, image_w, options.crowd_figure_height_range, box)[1]
    return full


def draw_image(rng: np.random.Generator, options: StickFigureOptions):
    """-> (uint8 image [H, W, 3], list of annotations {segmentation (RLE), area, bbox, keypoints, num_keypoints,
    iscrowd})."""
    image_h, image_w = (int(v) for v in rng.integers(options.image_size_range[0], options.image_size_range[1] + 1,
                                                     size=2))
    image, background_colour = textured_background(rng, image_h, image_w)
    placed: list[_Placed] = []
    if rng.uniform() >= options.empty_fraction:
        if rng.uniform() < options.crowd_fraction:
            _place(placed, _crowd(rng, image_h, image_w, options), None)
        for _ in range(int(rng.integers(options.figures_per_image[0], options.figures_per_image[1] + 1))):
            for _attempt in range(30):
                joints, full = _random_figure(rng, image_h, image_w, options.figure_height_range,
                                              (0.1 * image_w, 0.1 * image_h, 0.9 * image_w, 0.9 * image_h))
                in_image = _joints_in_image(joints, image_h, image_w).sum()
                if in_image >= options.min_joints_in_image and _fits(placed, full, options, image_h, image_w):
                    _place(placed, full, joints)
                    break

    y, x = np.mgrid[0:image_h, 0:image_w] + 0.5
    for p in placed:
        # Shading and a little noise so a figure is not one flat colour.
        colour = distinct_colour(rng, background_colour)
        theta = rng.uniform(0, 2 * np.pi)
        gradient = (x[p.full] * np.cos(theta) + y[p.full] * np.sin(theta)) / max(image_h, image_w)
        fill = colour + rng.uniform(-40, 40) * gradient[:, None]
        image[p.full] = fill + 4.0 * rng.standard_normal((int(p.full.sum()), 3), dtype=np.float32)

    annotations = []
    for p in placed:
        rle = mask_utils.encode(np.asfortranarray(p.visible.astype(np.uint8)))
        rows, cols = np.nonzero(p.visible)
        annotation = {
            "segmentation": {"size": [image_h, image_w], "counts": rle["counts"].decode("ascii")},
            "area": int(p.visible.sum()),
            "bbox": [int(cols.min()), int(rows.min()), int(cols.max() + 1 - cols.min()),
                     int(rows.max() + 1 - rows.min())],
            "iscrowd": int(p.joints is None),
        }
        keypoints = np.zeros((len(JOINT_NAMES), 3))
        if p.joints is not None:
            inside = _joints_in_image(p.joints, image_h, image_w)
            visibility = np.where(_visible_joints(p, image_h, image_w), 2, 1)
            keypoints[inside] = np.concatenate([p.joints, visibility[:, None]], axis=1)[inside]
        annotation["keypoints"] = [float(v) if i % 3 < 2 else int(v) for i, v in enumerate(keypoints.reshape(-1))]
        annotation["num_keypoints"] = int((keypoints[:, 2] > 0).sum())
        annotations.append(annotation)
    return np.clip(image, 0, 255).astype(np.uint8), annotations


# ----------------------------------------------------------------------------------------------------
# Writing the COCO folder.


def category() -> dict[str, Any]:
    """The COCO keypoint category, with the OKS sigmas under the extra key "kpt_oks_sigmas"."""
    return {"id": 1, "name": CATEGORY_NAME, "supercategory": CATEGORY_NAME, "keypoints": list(JOINT_NAMES),
            "skeleton": [[_JOINT[a] + 1, _JOINT[b] + 1] for a, b in SKELETON], "kpt_oks_sigmas": list(OKS_SIGMAS)}


def _info(split: str, num_images: int, seed: int, options: StickFigureOptions) -> dict[str, Any]:
    return {"description": "maskrcnn_jax stick figures", "split": split, "num_images": num_images, "seed": seed,
            "format_version": _FORMAT_VERSION, "options": dataclasses.asdict(options)}


def stick_figures_data_paths(out_dir: str) -> dict[str, str]:
    """The four data-config fields for a folder written by `generate`."""
    return generated.data_paths(out_dir, "keypoints")


def write_split(out_dir: str, split: str, num_images: int, seed: int, options: StickFigureOptions) -> str:
    """Draws `num_images` images and writes them with their annotation JSON; returns the JSON path."""

    def draw(index):
        pixels, figures = draw_image(np.random.default_rng([seed, _SPLIT_NUMBER[split], index]), options)
        return pixels, [{"category_id": 1, **figure} for figure in figures]

    return generated.write_split(out_dir, split, stick_figures_data_paths(out_dir)[f"{split}_json"], num_images,
                                 draw, options.jpeg_quality, _info(split, num_images, seed, options), [category()])


def generate(out_dir: str, num_train: int, num_val: int, seed: int = 0,
             options: StickFigureOptions = StickFigureOptions()) -> dict[str, str]:
    """Writes both splits unless `out_dir` already holds them for the same arguments; returns the paths
    (train_json, train_images, val_json, val_images)."""
    return generated.generate_splits(stick_figures_data_paths(out_dir), {"train": num_train, "val": num_val},
                                     lambda split, n: _info(split, n, seed, options),
                                     lambda split, n: write_split(out_dir, split, n, seed, options))


if __name__ == "__main__":
    generated.command_line(generate, "keypoint dataset")
