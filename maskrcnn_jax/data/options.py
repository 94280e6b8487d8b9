"""`InputOptions`: what the input pipeline does to each example, and `BuildOptions`: how the dataset builder treats
the files it reads. Their fields, with their defaults, are `data.*` fields of every config (config.base_config reads
them from here); no TensorFlow is imported."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from maskrcnn_jax.data import image_resize


@dataclasses.dataclass(frozen=True)
class InputOptions:
    """What the input pipeline does to each example. Every field is a config knob (see `from_config`).

    Resize modes: with `short_side` set, the short side is scaled to `short_side` unless that makes the long
    side exceed `long_side_max` (detectron2's ResizeShortestEdge); with `short_side=None` the image is
    scaled to fit the canvas (TF Model Garden's square canvas). Either way the result is padded to
    `canvas_size`. `scale_jitter=(lo, hi)` multiplies the training scale by U(lo, hi); a window of the
    canvas size is then cropped at random when the image outgrows the canvas.

    Canvases at inference and evaluation (`eval_canvas`): training always pads to the fixed `canvas_size` (one
    compiled step). "fixed" does the same for evaluation and the Predictor. "padded" pads each image, after the
    resize, to the next multiple of `size_divisibility` on each side, as torchvision and detectron2 pad a batch of
    one image (their `size_divisibility` is 32), so an imported model sees exactly the peer's input and gives its
    detections; each distinct canvas compiles once. To bound the compiles on a stream of many shapes, each padded
    side can be rounded further up, to the smallest of `eval_canvas_sides` that holds it, else (without a list,
    or beyond its largest side) to a multiple of `eval_canvas_step` (data/image_resize.py's padded_canvas). The
    extra padding changes the features near the image's bottom and right edges a little, as a peer's batch of
    images of different sizes does; the peers' own single-image results need both left at their defaults.
    """

    canvas_size: tuple[int, int] = (1024, 1024)  # (height, width)
    short_side: int | None = None
    long_side_max: int | None = None
    scale_jitter: tuple[float, float] = (1.0, 1.0)
    random_flip: bool = True
    max_instances: int = 100
    mask_size: int = 112
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB on the 0-255 scale
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    # How the resized size is made whole: "round" (half to even, the TF Model Garden's), "floor" (torchvision's
    # GeneralizedRCNNTransform) or "half_up" (detectron2's ResizeShortestEdge); evaluation and inference also take
    # that peer's float64 steps (image_resize.resized_size).
    size_rounding: str = "round"
    eval_canvas: str = "fixed"  # "fixed" | "padded" (image_resize.EVAL_CANVASES), for inference and evaluation
    size_divisibility: int = 32  # "padded": each canvas side is a multiple of this (the peers' 32)
    eval_canvas_step: int = 0  # "padded": > 0 rounds each side up to a multiple of this (a multiple of the above)
    eval_canvas_sides: tuple[int, ...] = ()  # "padded": each side rounded up to the smallest of these holding it
    mask_dtype: str = "float32"  # "float32": bilinear values in [0, 1]; "uint8": binarised at 0.5
    # The training canvas: "uint8" travels as pixels (the bilinear resize rounded, a quarter of float32's bytes) and
    # is normalised on the device, inside the train step; "float32" is normalised here, as evaluation images are.
    train_image_dtype: str = "uint8"
    shuffle_buffer: int = 1024
    deterministic: bool = True  # order and content are a function of the seed (needed for exact resume)
    # (name, mirrored name) pairs of keypoint types that a horizontal flip swaps; empty: derived from the
    # dataset's names, left_X <-> right_X (see keypoints.flip_permutation).
    keypoint_flip_map: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        # A config gives lists; a frozen dataclass wants tuples (hashable, comparable).
        object.__setattr__(self, "keypoint_flip_map", tuple(tuple(pair) for pair in self.keypoint_flip_map))
        for pair in self.keypoint_flip_map:
            if len(pair) != 2 or not all(isinstance(name, str) for name in pair):
                raise ValueError(f"keypoint_flip_map entries must be (name, mirrored name) pairs, got {pair!r}")
        if self.mask_dtype not in ("float32", "uint8"):
            raise ValueError(f"mask_dtype must be 'float32' or 'uint8', got {self.mask_dtype!r}")
        if self.train_image_dtype not in ("uint8", "float32"):
            raise ValueError(f"train_image_dtype must be 'uint8' or 'float32', got {self.train_image_dtype!r}")
        if self.size_rounding not in image_resize.SIZE_ROUNDINGS:
            raise ValueError(f"size_rounding must be one of {image_resize.SIZE_ROUNDINGS}, got "
                             f"{self.size_rounding!r}")
        object.__setattr__(self, "eval_canvas_sides", tuple(int(side) for side in self.eval_canvas_sides))
        if self.eval_canvas not in image_resize.EVAL_CANVASES:
            raise ValueError(f"eval_canvas must be one of {image_resize.EVAL_CANVASES}, got {self.eval_canvas!r}")
        image_resize.check_padding(self.size_divisibility, self.eval_canvas_step, self.eval_canvas_sides)
        if self.short_side is not None and self.long_side_max is None:
            raise ValueError("short_side needs long_side_max (use a large value for no limit)")
        lo, hi = self.scale_jitter
        if not 0 < lo <= hi:
            raise ValueError(f"scale_jitter must satisfy 0 < lo <= hi, got {self.scale_jitter}")

    @classmethod
    def from_config(cls, config: Any) -> "InputOptions":
        """Takes the fields of this class that `config` (a ConfigDict or mapping) has; ignores the rest."""
        return cls(**fields_from_config(cls, config))


# PIL's own hard stop: Image.open refuses more than twice Image.MAX_IMAGE_PIXELS (89,478,485, "a 1 GB RGBA image"),
# i.e. 178,956,970 pixels, with a DecompressionBombError. The builder's default limit is the same number, so the two
# agree where neither is changed.
PIL_MAX_PIXELS = 2 * (1024 * 1024 * 1024 // 4 // 3)


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How the COCO-format builder (data/coco_dataset.py) treats its inputs, which it takes for untrusted. Every
    field is a config knob (`data.<field>`) and a flag of `python -m maskrcnn_jax.data.build`.

    `allow_paths_outside_images_dir`: an image's `file_name` is read relative to its split's image folder, and one
    that resolves outside it (`../x.jpg`, an absolute path, or a link in the folder pointing out of it; both sides
    through os.path.realpath) stops the build with an error naming the image, so that a downloaded annotation file
    cannot make the builder read, and store in the records, any file of the machine. True reads such paths as given
    (for a JSON whose `file_name`s are absolute on purpose).

    `max_image_pixels`: an image whose header claims more pixels (width x height) than this is skipped and counted
    (`too_many_pixels` in the build summary) before it is decoded: a small file can claim a huge image (a
    "decompression bomb"), and decoding it, and the full-image instance masks of its annotations, would take width x
    height bytes each. The default, 178,956,970 (PIL's own hard stop, twice its Image.MAX_IMAGE_PIXELS), is some
    580 times a COCO image (640 x 480) and holds a 13,000 x 13,000 scan; a limit above it lifts PIL's own check for
    these reads only.
    """

    allow_paths_outside_images_dir: bool = False
    max_image_pixels: int = PIL_MAX_PIXELS

    def __post_init__(self):
        if not isinstance(self.allow_paths_outside_images_dir, bool):
            raise ValueError(f"allow_paths_outside_images_dir must be True or False, got "
                             f"{self.allow_paths_outside_images_dir!r}")
        if isinstance(self.max_image_pixels, bool) or not isinstance(self.max_image_pixels, int) or \
                self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive integer, got {self.max_image_pixels!r}")

    @classmethod
    def from_config(cls, config: Any) -> "BuildOptions":
        """Takes the fields of this class that `config` (a ConfigDict, mapping or object) has; ignores the rest."""
        return cls(**fields_from_config(cls, config))


def fields_from_config(cls: type, config: Any) -> dict[str, Any]:
    """{field: value} of the dataclass `cls`'s fields that `config` (a ConfigDict, mapping or object) sets (not
    None), lists as tuples (the dataclasses are frozen and hashable)."""
    values = {}
    for field in dataclasses.fields(cls):
        value = config.get(field.name) if isinstance(config, Mapping) else getattr(config, field.name, None)
        if value is not None:
            values[field.name] = tuple(value) if isinstance(value, (list, tuple)) else value
    return values


def optional_value_type(name: str) -> type:
    """The type of a field whose default is None (int for `int | None`), for a config placeholder."""
    arguments = [a for a in typing.get_args(typing.get_type_hints(InputOptions)[name]) if a is not type(None)]
    if len(arguments) != 1:
        raise TypeError(f"InputOptions.{name} is not an optional field of one type")
    return arguments[0]
