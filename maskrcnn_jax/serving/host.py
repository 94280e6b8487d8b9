"""The host side of inference, in NumPy alone: image -> canvas batch, and fixed-size detections -> results in the
original image's pixels and the dataset's category ids.

The `Predictor`, the exported-model loader and COCO evaluation all map detections back through this module, so they
agree to the bit. It imports nothing from the rest of the package but data/image_resize.py: copied next to
exported_model.py with that file, it serves an exported model without this codebase.

The resize is the evaluation pipeline's (data/image_resize.py's resized_size, in the peers' float64 steps): scale to
fit the canvas (or short side / long side limit), make the size whole by `size_rounding`, resample bilinearly with half-pixel
centres and no antialiasing (tf.image.resize, and torch's interpolate(align_corners=False)), normalise, pad: to the
fixed canvas, or with eval_canvas "padded" to the image's own canvas (image_resize.padded_canvas), where a list of
images is grouped by canvas into batches and each distinct canvas is one compiled network.
Masks are pasted by detectron2's rule as ops.paste_masks does (pixel centres read the 28 x 28 grid bilinearly, zero
outside), here only over each box's own rows and columns, or by torchvision's (for parity with its models).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

try:
    from maskrcnn_jax.data import image_resize
    from maskrcnn_jax.serving import keypoints as keypoint_decoding
except ImportError:  # copied out of the package, next to image_resize.py and keypoints.py
    import image_resize
    import keypoints as keypoint_decoding
# "detectron2": pixel centres read the m x m grid bilinearly in the exact box (ops.paste_masks);
# "torchvision": the grid, padded by one zero cell, is resized into the grown box rounded to whole pixels.
# "matterport": the Mask R-CNN seed document's unmold_mask (Matterport's implementation): the grid resized to the
# box rounded to whole pixels by scikit-image's bilinear resize (zero outside the grid, clipped to its range).
MASK_PASTE_RULES = ("detectron2", "torchvision", "matterport")


@dataclasses.dataclass(frozen=True)
class InferenceSpec:
    """Everything besides the network that inference needs: the canvas and resize, normalisation, the mask
    threshold, the batch size the network runs at, and the label map (label k -> category_ids[k - 1])."""

    canvas_size: tuple[int, int]
    short_side: int | None
    long_side_max: int | None
    size_rounding: str
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    mask_threshold: float
    mask_paste: str  # MASK_PASTE_RULES
    batch_size: int
    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    # The canvas of each image (data/options.py's fields of the same names): the fixed canvas_size, or "padded".
    eval_canvas: str = "fixed"
    size_divisibility: int = 32
    eval_canvas_step: int = 0
    eval_canvas_sides: tuple[int, ...] = ()
    # A keypoint model's keypoint types (empty otherwise), its skeleton (0-based pairs, for drawing) and how its
    # heatmaps are decoded (serving/keypoints.py's rules: "torchvision" or "detectron2").
    keypoint_names: tuple[str, ...] = ()
    keypoint_skeleton: tuple[tuple[int, int], ...] = ()
    keypoint_decode: str = "torchvision"

    def __post_init__(self):
        if self.eval_canvas not in image_resize.EVAL_CANVASES:
            raise ValueError(f"eval_canvas must be one of {image_resize.EVAL_CANVASES}, got {self.eval_canvas!r}")
        image_resize.check_padding(self.size_divisibility, self.eval_canvas_step, self.eval_canvas_sides)
        if self.size_rounding not in image_resize.SIZE_ROUNDINGS:
            raise ValueError(f"size_rounding must be one of {image_resize.SIZE_ROUNDINGS}, got {self.size_rounding!r}")
        if self.mask_paste not in MASK_PASTE_RULES:
            raise ValueError(f"mask_paste must be one of {MASK_PASTE_RULES}, got {self.mask_paste!r}")
        if len(self.category_ids) != len(self.names):
            raise ValueError("category_ids and names differ in length")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "InferenceSpec":
        values = json.loads(text)
        for key in ("canvas_size", "pixel_mean", "pixel_std", "category_ids", "names", "eval_canvas_sides",
                    "keypoint_names"):
            if key in values:
                values[key] = tuple(values[key])
        if "keypoint_skeleton" in values:
            values["keypoint_skeleton"] = tuple(tuple(pair) for pair in values["keypoint_skeleton"])
        return cls(**values)

    def canvas_for(self, image_size: Sequence[int]) -> tuple[int, int]:
        """The canvas (height, width) of an image resized to `image_size`: the fixed canvas, or its padded one."""
        if self.eval_canvas == "fixed":
            return tuple(int(v) for v in self.canvas_size)
        return image_resize.padded_canvas(image_size, self.size_divisibility, self.eval_canvas_step,
                                          self.eval_canvas_sides)


# ----------------------------------------------------------------------------------------------------
# Images in.


def as_rgb_uint8(image: Any) -> np.ndarray:
    """uint8 [H, W, 3] from an H x W (grayscale), H x W x 1, x 3 or x 4 (RGBA: alpha dropped) array of uint8, or
    uint16 (the high byte is kept, as the input pipeline does). Anything else is a ValueError saying what it got."""
    array = np.asarray(image)
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (or uint16) arrays, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be H x W, H x W x 1, 3 or 4, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"empty image of shape {array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def resized_size(height: int, width: int, spec: InferenceSpec) -> tuple[int, int]:
    """(h_s, w_s) of the image on the canvas, by data/image_resize.py's resized_size (the peers' arithmetic, which
    the evaluation pipeline uses too)."""
    return image_resize.resized_size(height, width, spec.canvas_size, spec.short_side, spec.long_side_max,
                                     spec.size_rounding)


def _axis_samples(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel bilinear sampling along one axis: (lower index, upper index, upper weight) per output pixel."""
    scale = np.float32(in_size) / np.float32(out_size)
    position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(position)
    lower = np.clip(floor, 0, in_size - 1).astype(np.intp)
    upper = np.clip(np.ceil(position), 0, in_size - 1).astype(np.intp)
    return lower, upper, (position - floor).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 or float [H, W, C] -> float32 [h, w, C], bilinear with half-pixel centres and no antialiasing
    (interpolating along x, then y, as tf.image.resize does)."""
    y_lower, y_upper, y_weight = _axis_samples(image.shape[0], size[0])
    x_lower, x_upper, x_weight = _axis_samples(image.shape[1], size[1])

    def along_x(rows):
        rows = rows.astype(np.float32)
        left, right = rows[:, x_lower], rows[:, x_upper]
        return left + (right - left) * x_weight[None, :, None]

    top, bottom = along_x(image[y_lower]), along_x(image[y_upper])
    return top + (bottom - top) * y_weight[:, None, None]


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    canvas: np.ndarray  # float32 [Hc, Wc, 3], normalised, the image in the top-left window
    image_size: tuple[int, int]  # the window
    original_size: tuple[int, int]


def prepare_image(image: Any, spec: InferenceSpec,
                  canvas_for: Callable[[tuple[int, int]], tuple[int, int]] | None = None) -> PreparedImage:
    """The image resized, normalised and padded to its canvas: `canvas_for(resized size)`, by default
    spec.canvas_for."""
    rgb = as_rgb_uint8(image)
    size = resized_size(rgb.shape[0], rgb.shape[1], spec)
    canvas_h, canvas_w = (canvas_for or spec.canvas_for)(size)
    if size[0] > canvas_h or size[1] > canvas_w:
        raise ValueError(f"an image resized to {size} does not fit the {(canvas_h, canvas_w)} canvas: the config's "
                         f"long_side_max is larger than the canvas")
    canvas = np.zeros((canvas_h, canvas_w, 3), np.float32)
    resized = resize_bilinear(rgb, size)
    canvas[: size[0], : size[1]] = (resized - np.asarray(spec.pixel_mean, np.float32)) / np.asarray(
        spec.pixel_std, np.float32)
    return PreparedImage(canvas, size, rgb.shape[:2])


# ----------------------------------------------------------------------------------------------------
# Results out.


def _paste_axis_weights(start: float, end: float, first: int, stop: int, mask_size: int) -> np.ndarray:
    """[stop - first, m] weights of pixels first..stop-1 on the mask grid over [start, end] (ops.masks' rule)."""
    centres = np.arange(first, stop, dtype=np.float32) + np.float32(0.5)
    positions = (centres - np.float32(start)) / np.float32(end - start) * np.float32(mask_size) - np.float32(0.5)
    cells = np.arange(mask_size, dtype=np.float32)
    return np.maximum(np.float32(0), np.float32(1) - np.abs(positions[:, None] - cells))


def _paste_detectron2(mask: np.ndarray, box: np.ndarray, height: int, width: int) -> tuple[slice, slice, np.ndarray]:
    x1, y1, x2, y2 = box
    mask_size = mask.shape[-1]
    # Only pixels within half a mask cell of the box can read a non-zero value.
    margin_y, margin_x = 0.5 * (y2 - y1) / mask_size + 1, 0.5 * (x2 - x1) / mask_size + 1
    top, bottom = max(int(np.floor(y1 - margin_y)), 0), min(int(np.ceil(y2 + margin_y)), height)
    left, right = max(int(np.floor(x1 - margin_x)), 0), min(int(np.ceil(x2 + margin_x)), width)
    if top >= bottom or left >= right:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0), np.float32)
    rows = _paste_axis_weights(y1, y2, top, bottom, mask_size)
    columns = _paste_axis_weights(x1, x2, left, right, mask_size)
    return slice(top, bottom), slice(left, right), rows @ mask @ columns.T


def _paste_torchvision(mask: np.ndarray, box: np.ndarray, height: int, width: int) -> tuple[slice, slice, np.ndarray]:
    """torchvision's paste_masks_in_image, in its float32 steps: pad the grid by one zero cell, grow the box about
    its centre by (m + 2) / m, truncate it to integers, resize the padded grid to (y1 - y0 + 1, x1 - x0 + 1)
    pixels and place it there."""
    mask_size = mask.shape[-1]
    scale = np.float32((mask_size + 2) / mask_size)
    x1, y1, x2, y2 = box
    half_w, half_h = (x2 - x1) * np.float32(0.5) * scale, (y2 - y1) * np.float32(0.5) * scale
    centre_x, centre_y = (x2 + x1) * np.float32(0.5), (y2 + y1) * np.float32(0.5)
    grown = np.trunc(np.asarray([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h]))
    x0, y0, x1, y1 = (int(v) for v in grown)
    resized = resize_bilinear(np.pad(mask, 1)[..., None], (max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)))[..., 0]
    top, bottom, left, right = max(y0, 0), min(y1 + 1, height), max(x0, 0), min(x1 + 1, width)
    if top >= bottom or left >= right:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0), np.float32)
    return slice(top, bottom), slice(left, right), resized[top - y0:bottom - y0, left - x0:right - x0]


def _zero_padded_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of scipy.ndimage.zoom's order-1 resize with grid_mode=True and mode "grid-constant" (what
    skimage.transform.resize does with mode="constant", cval=0): output pixel o reads the input at
    (o + 0.5) * in / out - 0.5, bilinearly, with zeros beyond the first and last input cells."""
    position = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    lower = np.floor(position).astype(np.intp)
    upper_weight = position - lower
    weights = np.zeros((out_size, in_size), np.float64)
    for index, weight in ((lower, 1.0 - upper_weight), (lower + 1, upper_weight)):
        inside = (index >= 0) & (index < in_size)
        weights[np.flatnonzero(inside), index[inside]] += weight[inside]
    return weights


def _paste_matterport(mask: np.ndarray, box: np.ndarray, height: int, width: int) -> tuple[slice, slice, np.ndarray]:
    """The seed document's unmold_mask: the box rounded to whole pixels, the grid resized to it as
    skimage.transform.resize(mask, (h, w), order=1, mode="constant", cval=0, clip=True, anti_aliasing=False) does,
    placed there (the part inside the image)."""
    x0, y0, x1, y1 = (int(v) for v in np.round(np.asarray(box, np.float64)))
    if y1 <= y0 or x1 <= x0:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0), np.float32)
    grid = np.asarray(mask, np.float64)
    resized = (_zero_padded_bilinear_weights(grid.shape[0], y1 - y0) @ grid
               @ _zero_padded_bilinear_weights(grid.shape[1], x1 - x0).T)
    # skimage's clip=True: to the grid's range, widened to the zero padding only when the grid excludes 0 and the
    # output spans it.
    low, high = grid.min(), grid.max()
    if not low <= 0.0 <= high and resized.min() <= 0.0 <= resized.max():
        low, high = min(low, 0.0), max(high, 0.0)
    resized = np.clip(resized, low, high)
    top, bottom, left, right = max(y0, 0), min(y1, height), max(x0, 0), min(x1, width)
    if top >= bottom or left >= right:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0), np.float32)
    return slice(top, bottom), slice(left, right), resized[top - y0:bottom - y0, left - x0:right - x0]


PASTE_RULES = {"detectron2": _paste_detectron2, "torchvision": _paste_torchvision, "matterport": _paste_matterport}


class MaskCrop(NamedTuple):
    """A pasted mask's pixels inside the part of the image its paste rule can touch: the full mask is `pixels` at
    rows top.., columns left.. and False everywhere else."""
    top: int
    left: int
    pixels: np.ndarray  # bool [h, w]


def paste_mask_crops(masks: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float,
                     rule: str = "detectron2") -> list[MaskCrop]:
    """[N, m, m] probabilities in xyxy `boxes` [N, 4] (image pixels) -> N MaskCrops in a height x width image,
    pasted by `rule` (MASK_PASTE_RULES) and binarised as each library does: detectron2 and the seed document keep
    probabilities >= threshold, torchvision's evaluation those > threshold (saturated masks paste many pixels of
    exactly 0.5). A degenerate box pastes nothing."""
    if rule not in MASK_PASTE_RULES:
        raise ValueError(f"mask paste rule must be one of {MASK_PASTE_RULES}, got {rule!r}")
    paste_one = PASTE_RULES[rule]
    binarise = np.greater if rule == "torchvision" else np.greater_equal
    crops = []
    for mask, box in zip(np.asarray(masks, np.float32), np.asarray(boxes, np.float32)):
        if not (box[2] > box[0] and box[3] > box[1]):
            crops.append(MaskCrop(0, 0, np.zeros((0, 0), bool)))
            continue
        rows, columns, values = paste_one(mask, box, height, width)
        crops.append(MaskCrop(rows.start, columns.start, binarise(values, threshold)))
    return crops


def full_masks(crops: Sequence[MaskCrop], height: int, width: int) -> np.ndarray:
    """MaskCrops -> bool [N, height, width]."""
    out = np.zeros((len(crops), height, width), bool)
    for crop, target in zip(crops, out):
        h, w = crop.pixels.shape
        target[crop.top:crop.top + h, crop.left:crop.left + w] = crop.pixels
    return out


def paste_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float,
                rule: str = "detectron2") -> np.ndarray:
    """paste_mask_crops as full masks: bool [N, height, width]."""
    return full_masks(paste_mask_crops(masks, boxes, height, width, threshold, rule), height, width)


def boxes_to_original(boxes: np.ndarray, image_size: Sequence[int], original_size: Sequence[int]) -> np.ndarray:
    """Canvas xyxy -> original pixels: times original / resized per axis in float32 (torchvision's and
    detectron2's arithmetic), clipped to the image."""
    ratio_y = np.float32(original_size[0]) / np.float32(image_size[0])
    ratio_x = np.float32(original_size[1]) / np.float32(image_size[1])
    out = np.asarray(boxes, np.float32) * np.asarray([ratio_x, ratio_y, ratio_x, ratio_y], np.float32)
    out[:, 0::2] = np.clip(out[:, 0::2], 0, original_size[1])
    out[:, 1::2] = np.clip(out[:, 1::2], 0, original_size[0])
    return out


def keypoints_to_original(keypoints: np.ndarray, image_size: Sequence[int], original_size: Sequence[int]
                          ) -> np.ndarray:
    """Canvas (x, y, score) keypoints [N, K, 3] -> original pixels: x and y times original / resized per axis in
    float32, as boxes_to_original (and torchvision's resize_keypoints); scores unchanged."""
    ratio_y = np.float32(original_size[0]) / np.float32(image_size[0])
    ratio_x = np.float32(original_size[1]) / np.float32(image_size[1])
    return np.asarray(keypoints, np.float32) * np.asarray([ratio_x, ratio_y, 1], np.float32)


def image_results(outputs: Mapping[str, np.ndarray], prepared: PreparedImage, spec: InferenceSpec,
                  score_threshold: float, mask_crops: bool = False) -> dict[str, Any]:
    """One image's fixed-size network outputs (boxes [D, 4] on the canvas, scores, classes 1..K, valid [D], and
    masks [D, m, m] or keypoint_heatmaps [D, m, m, K] as the model has them) -> {'boxes' [N, 4] original xyxy,
    'scores' [N], 'labels' [N] category ids, 'names', and 'masks' [N, H, W] bool (with `mask_crops`, 'mask_crops':
    N MaskCrops instead, which skips writing N full images), 'keypoints' [N, K, 3] (x, y, score in original
    pixels)}, the valid detections scoring at least `score_threshold`, best first."""
    keep = np.asarray(outputs["valid"], bool) & (np.asarray(outputs["scores"]) >= score_threshold)
    order = np.argsort(-np.asarray(outputs["scores"])[keep], kind="stable")
    classes = np.asarray(outputs["classes"])[keep][order]
    canvas_boxes = np.asarray(outputs["boxes"])[keep][order]
    boxes = boxes_to_original(canvas_boxes, prepared.image_size, prepared.original_size)
    height, width = prepared.original_size
    label_to_id = np.asarray((-1,) + tuple(spec.category_ids), np.int64)
    results = {
        "boxes": boxes,
        "scores": np.asarray(outputs["scores"], np.float32)[keep][order],
        "labels": label_to_id[classes],
        "names": [spec.names[c - 1] for c in classes],
    }
    if "masks" in outputs:
        crops = paste_mask_crops(np.asarray(outputs["masks"])[keep][order], boxes, height, width,
                                 spec.mask_threshold, spec.mask_paste)
        if mask_crops:
            results["mask_crops"] = crops
        else:
            results["masks"] = full_masks(crops, height, width)
    if "keypoint_heatmaps" in outputs:
        # Decoded in the canvas' pixels, where the heatmaps' boxes are, then scaled like the boxes.
        heatmaps = np.asarray(outputs["keypoint_heatmaps"])[keep][order]
        decoded = keypoint_decoding.heatmaps_to_keypoints(heatmaps, canvas_boxes, spec.keypoint_decode)
        results["keypoints"] = keypoints_to_original(decoded, prepared.image_size, prepared.original_size)
    return results


RunBatch = Callable[[np.ndarray, np.ndarray], Mapping[str, np.ndarray]]
# predict_images holds at most this many batches' worth of images back while it waits for images of the same
# canvas: then it runs the group that holds the oldest waiting image, filled up, so memory stays bounded.
GROUPING_WINDOW_BATCHES = 8


def predict_images(images: Iterable[Any], run_batch: RunBatch, spec: InferenceSpec, score_threshold: float,
                   canvas_for: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
                   window: int | None = None) -> Iterator[dict[str, Any]]:
    """Runs `run_batch(canvases [B, Hc, Wc, 3] float32, image_sizes [B, 2] int32)` over the images and yields each
    image's results in input order.

    Images are grouped by canvas (`canvas_for`, by default spec.canvas_for: one canvas when it is fixed) into
    batches of spec.batch_size, so a batch always has one shape. A group runs when it is full; when `window`
    images (default GROUPING_WINDOW_BATCHES batches) have arrived since the oldest image still waiting, the group
    holding that one runs filled up by repeating its last image, and so does every group left at the end."""
    batch_size = spec.batch_size
    window = window or GROUPING_WINDOW_BATCHES * batch_size
    groups: dict[tuple[int, ...], list[tuple[int, PreparedImage]]] = {}  # canvas -> waiting (index, image)
    finished: dict[int, dict[str, Any]] = {}
    next_out = 0

    def run(canvas):
        group = groups.pop(canvas)
        filled = [p for _, p in group] + [group[-1][1]] * (batch_size - len(group))
        canvases = np.stack([p.canvas for p in filled])
        sizes = np.asarray([p.image_size for p in filled], np.int32)
        outputs = {k: np.asarray(v) for k, v in run_batch(canvases, sizes).items()}
        for row, (index, prepared) in enumerate(group):
            finished[index] = image_results({k: v[row] for k, v in outputs.items()}, prepared, spec,
                                            score_threshold)

    def oldest_waiting():
        return min(groups, key=lambda canvas: groups[canvas][0][0])

    count = 0
    for index, image in enumerate(images):
        count = index + 1
        prepared = prepare_image(image, spec, canvas_for)
        canvas = prepared.canvas.shape[:2]
        groups.setdefault(canvas, []).append((index, prepared))
        if len(groups[canvas]) == batch_size:
            run(canvas)
        while groups and index - groups[oldest_waiting()][0][0] + 1 >= window:
            run(oldest_waiting())
        while next_out in finished:
            yield finished.pop(next_out)
            next_out += 1
    while groups:
        run(oldest_waiting())
    while next_out < count:
        yield finished.pop(next_out)
        next_out += 1


def is_single_image(images: Any) -> bool:
    """A lone array (H x W or H x W x C) rather than a list or batch of images."""
    return isinstance(images, np.ndarray) and images.ndim in (2, 3)


class ImagePredictor:
    """Images in, results out, for any network that provides `spec` and `run_batch` (see predict_images):
    calling it on one image returns its result dict, on a list of images a list of them."""

    spec: InferenceSpec

    def run_batch(self, canvases: np.ndarray, image_sizes: np.ndarray) -> Mapping[str, np.ndarray]:
        raise NotImplementedError

    def canvas_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The canvas an image resized to `image_size` runs on (spec.canvas_for)."""
        return self.spec.canvas_for(image_size)

    def predict_iter(self, images: Iterable[Any], score_threshold: float = 0.5) -> Iterator[dict[str, Any]]:
        """Results of each image in input order, computed a batch of one canvas at a time."""
        return predict_images(images, self.run_batch, self.spec, score_threshold, self.canvas_for)

    def __call__(self, images: Any, score_threshold: float = 0.5) -> dict[str, Any] | list[dict[str, Any]]:
        if is_single_image(images):
            return next(self.predict_iter([images], score_threshold))
        return list(self.predict_iter(images, score_threshold))
