"""Per-example TensorFlow transforms: decode, resize with scale jitter, crop, flip, normalise, pad, and crop
ground-truth masks to their boxes. All geometry is in continuous pixel coordinates (pixel k covers [k, k+1)).

The geometric transform of one example, from the upright original image (h, w) to the canvas:

    1. scale:  x_s = x * sx,  y_s = y * sy,  with sx = w_s / w, sy = h_s / h and (h_s, w_s) the rounded
               resized size (so the two factors differ only by rounding);
    2. crop:   x_c = x_s - offset_x, y_c = y_s - offset_y, keeping a window of at most the canvas size
               (training only: when jitter makes the image larger than the canvas, the offset is random);
    3. flip:   x_f = content_w - x_c (training only, with probability 1/2), content_w = the window's width;
    4. pad:    the window sits at the canvas' top-left corner; the rest of the canvas is 0 after
               normalisation (i.e. the mean colour).

Boxes follow 1-3 exactly, are clipped to the window, and a box left with no area becomes invalid.
Keypoints follow 1-3 exactly too; one that lands outside the window ([0, w] x [0, h], edges included) becomes
(0, 0, 0), as do unlabelled ones (v = 0) and all those of an invalid instance. A flip also swaps mirrored
keypoint types (left_wrist <-> right_wrist) through the dataset's flip permutation (keypoints.flip_permutation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import tensorflow as tf

from maskrcnn_jax.data import image_resize
from maskrcnn_jax.data.options import InputOptions

# A box must keep at least this extent in canvas pixels after cropping to stay a ground-truth instance
# (detectron2's filter_empty_instances threshold).
MIN_BOX_SIDE = 1e-5


# ----------------------------------------------------------------------------------------------------
# Pieces.


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG/BMP/GIF bytes with any channel count and 8 or 16 bits -> uint8 [h, w, 3] RGB.

    Grayscale is repeated, alpha dropped, 16-bit keeps its high byte. (EXIF orientation was applied when the
    dataset was built, so the bytes here are already upright.)
    """
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize_scale(height: tf.Tensor, width: tf.Tensor, options: InputOptions) -> tf.Tensor:
    """The scale factor that the resize mode gives an image of this size, before jitter (float32; the rule of
    data/image_resize.py, which the serving host shares)."""
    height, width = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    return image_resize.resize_scale(height, width, options.canvas_size, options.short_side, options.long_side_max,
                                     tf.math)


def scaled_size(height: tf.Tensor, width: tf.Tensor, scale: tf.Tensor, rounding: str = "round") -> tf.Tensor:
    """Whole (h_s, w_s) int32 by `rounding` (image_resize.SIZE_ROUNDINGS), at least 1 pixel each."""
    exact = tf.stack([tf.cast(height, tf.float32), tf.cast(width, tf.float32)]) * scale
    return tf.cast(image_resize.whole_size(exact, rounding, tf.math), tf.int32)


def transform_boxes(boxes: tf.Tensor, scale_yx: tf.Tensor, offset_yx: tf.Tensor, content_size: tf.Tensor,
                    flip: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Original xyxy boxes [n, 4] -> (canvas xyxy boxes [n, 4], valid [n]) by steps 1-3 of the module doc."""
    boxes = tf.cast(boxes, tf.float32)
    sy, sx = tf.cast(scale_yx[0], tf.float32), tf.cast(scale_yx[1], tf.float32)
    oy, ox = tf.cast(offset_yx[0], tf.float32), tf.cast(offset_yx[1], tf.float32)
    ch, cw = tf.cast(content_size[0], tf.float32), tf.cast(content_size[1], tf.float32)
    x1 = tf.clip_by_value(boxes[:, 0] * sx - ox, 0.0, cw)
    y1 = tf.clip_by_value(boxes[:, 1] * sy - oy, 0.0, ch)
    x2 = tf.clip_by_value(boxes[:, 2] * sx - ox, 0.0, cw)
    y2 = tf.clip_by_value(boxes[:, 3] * sy - oy, 0.0, ch)
    valid = tf.logical_and(x2 - x1 > MIN_BOX_SIDE, y2 - y1 > MIN_BOX_SIDE)
    x1, x2 = tf.where(flip, cw - x2, x1), tf.where(flip, cw - x1, x2)
    return tf.stack([x1, y1, x2, y2], axis=-1), valid


def transform_keypoints(keypoints: tf.Tensor, scale_yx: tf.Tensor, offset_yx: tf.Tensor, content_size: tf.Tensor,
                        flip: tf.Tensor, flip_permutation: Sequence[int]) -> tf.Tensor:
    """Original (x, y, v) keypoints [n, K, 3] -> canvas keypoints [n, K, 3] by steps 1-3 of the module doc.

    Keypoints that are unlabelled or land outside the window become (0, 0, 0). When `flip` is true, type i of
    the result is type `flip_permutation[i]` of the input, mirrored.
    """
    keypoints = tf.cast(keypoints, tf.float32)
    sy, sx = tf.cast(scale_yx[0], tf.float32), tf.cast(scale_yx[1], tf.float32)
    oy, ox = tf.cast(offset_yx[0], tf.float32), tf.cast(offset_yx[1], tf.float32)
    ch, cw = tf.cast(content_size[0], tf.float32), tf.cast(content_size[1], tf.float32)
    x = keypoints[..., 0] * sx - ox
    y = keypoints[..., 1] * sy - oy
    v = keypoints[..., 2]
    kept = (v > 0) & (x >= 0) & (x <= cw) & (y >= 0) & (y <= ch)
    x = tf.where(flip, cw - x, x)
    canvas = tf.where(kept[..., None], tf.stack([x, y, v], axis=-1), 0.0)
    return tf.cond(flip, lambda: tf.gather(canvas, list(flip_permutation), axis=1), lambda: canvas)


def crop_masks_to_boxes(masks: tf.Tensor, boxes: tf.Tensor, mask_size: int) -> tf.Tensor:
    """Bilinear M x M crops of full-image masks [n, H, W, 1] (any numeric dtype) at xyxy `boxes` [n, 4]
    given in those masks' own pixel coordinates -> float32 [n, M, M].

    Convention: cell (i, j) samples the mask at
        x = x1 + (j + 0.5) * (x2 - x1) / M,   y = y1 + (i + 0.5) * (y2 - y1) / M,
    bilinearly between pixel centres (pixel k's centre is k + 0.5), clamped to the edge pixel outside the
    outermost centres (RoIAlign's border rule).

    tf.image.crop_and_resize samples index coordinate u = x_n * (W' - 1) + j * (x2_n - x1_n) * (W' - 1) / (M - 1)
    of an image of width W' whose pixel centres sit at integer u. We pad the mask by one replicated pixel
    on every side (W' = W + 2, u = x - 0.5 + 1 = x + 0.5; the padding realises the edge clamp and keeps
    u inside [0, W'-1] for every x in [0, W]) and solve for the normalised box:
        u_0     = x1 + 0.5 w / M + 0.5        ->  x1_n = (x1 + 0.5 w / M + 0.5) / (W + 1)
        u_{M-1} = x2 - 0.5 w / M + 0.5        ->  x2_n = (x2 - 0.5 w / M + 0.5) / (W + 1)
    (for M = 1 crop_and_resize samples the centre (x1_n + x2_n) / 2, which is the same point).
    """
    boxes = tf.cast(boxes, tf.float32)
    height = tf.cast(tf.shape(masks)[1], tf.float32)
    width = tf.cast(tf.shape(masks)[2], tf.float32)
    boxes = tf.clip_by_value(boxes, 0.0, tf.stack([width, height, width, height]))
    half_cell_x = 0.5 * (boxes[:, 2] - boxes[:, 0]) / mask_size
    half_cell_y = 0.5 * (boxes[:, 3] - boxes[:, 1]) / mask_size
    normalized = tf.stack([
        (boxes[:, 1] + half_cell_y + 0.5) / (height + 1.0),
        (boxes[:, 0] + half_cell_x + 0.5) / (width + 1.0),
        (boxes[:, 3] - half_cell_y + 0.5) / (height + 1.0),
        (boxes[:, 2] - half_cell_x + 0.5) / (width + 1.0),
    ], axis=-1)
    padded = _replicate_border(masks)
    crops = tf.image.crop_and_resize(padded, normalized, tf.range(tf.shape(masks)[0]), [mask_size, mask_size],
                                     method="bilinear")
    return crops[..., 0]


def _replicate_border(images: tf.Tensor) -> tf.Tensor:
    """[n, H, W, C] -> [n, H + 2, W + 2, C] with the edge pixels repeated once outward. (Concatenation, since
    tf.pad's SYMMETRIC mode is some 30x slower on the CPU.)"""
    images = tf.concat([images[:, :1], images, images[:, -1:]], axis=1)
    return tf.concat([images[:, :, :1], images, images[:, :, -1:]], axis=2)


def _decode_masks(encoded_masks: tf.Tensor) -> tf.Tensor:
    return tf.map_fn(lambda png: tf.io.decode_png(png, channels=1), encoded_masks,
                     fn_output_signature=tf.TensorSpec([None, None, 1], tf.uint8))


def _pad_to(tensor: tf.Tensor, length: int) -> tf.Tensor:
    pad = [[0, length - tf.shape(tensor)[0]]] + [[0, 0]] * (len(tensor.shape) - 1)
    padded = tf.pad(tensor, pad)
    padded.set_shape([length] + tensor.shape[1:].as_list())
    return padded


# ----------------------------------------------------------------------------------------------------
# Whole examples.


def _image_to_canvas(image: tf.Tensor, size: tf.Tensor, offset_yx: tf.Tensor, content_size: tf.Tensor,
                     flip: tf.Tensor, options: InputOptions, canvas_size: tuple[int, int],
                     normalize: bool = True) -> tf.Tensor:
    """The resized, cropped and flipped image in the canvas' top-left window: normalised, float32 and 0 outside the
    window; or with normalize=False uint8 pixels (the resize rounded) and 0 outside, for ops.normalize_canvas on the
    device."""
    resized = tf.image.resize(image, size, method="bilinear")  # float32, half-pixel centres
    window = resized[offset_yx[0]:offset_yx[0] + content_size[0], offset_yx[1]:offset_yx[1] + content_size[1]]
    window = tf.cond(flip, lambda: tf.reverse(window, axis=[1]), lambda: window)
    if normalize:
        window = (window - tf.constant(options.pixel_mean, tf.float32)) / tf.constant(options.pixel_std, tf.float32)
    else:
        window = tf.cast(tf.clip_by_value(tf.round(window), 0.0, 255.0), tf.uint8)
    canvas_h, canvas_w = canvas_size
    canvas = tf.pad(window, [[0, canvas_h - content_size[0]], [0, canvas_w - content_size[1]], [0, 0]])
    canvas.set_shape([canvas_h, canvas_w, 3])
    return canvas


def _ground_truth(objects: Mapping[str, tf.Tensor], original_hw: tf.Tensor, scale_yx: tf.Tensor,
                  offset_yx: tf.Tensor, content_size: tf.Tensor, flip: tf.Tensor,
                  options: InputOptions, keypoint_flip: Sequence[int] | None) -> dict[str, tf.Tensor]:
    """Canvas boxes, classes, crowd flags, validity, box-cropped masks and (with `keypoint_flip`, the dataset's
    flip permutation, whose length is K) keypoints, padded to max_instances."""
    count = tf.minimum(tf.shape(objects["label"])[0], options.max_instances)
    boxes = objects["box"][:count]
    canvas_boxes, valid = transform_boxes(boxes, scale_yx, offset_yx, content_size, flip)

    # The crop is taken from the original-resolution mask at the preimage of the canvas box, which is exactly
    # where the canvas-frame convention samples (scaling and cropping are affine; a flipped crop is the
    # mirrored crop), without interpolating the mask twice.
    unflipped_x1 = tf.where(flip, tf.cast(content_size[1], tf.float32) - canvas_boxes[:, 2], canvas_boxes[:, 0])
    unflipped_x2 = tf.where(flip, tf.cast(content_size[1], tf.float32) - canvas_boxes[:, 0], canvas_boxes[:, 2])
    oy, ox = tf.cast(offset_yx[0], tf.float32), tf.cast(offset_yx[1], tf.float32)
    preimage = tf.stack([(unflipped_x1 + ox) / scale_yx[1], (canvas_boxes[:, 1] + oy) / scale_yx[0],
                         (unflipped_x2 + ox) / scale_yx[1], (canvas_boxes[:, 3] + oy) / scale_yx[0]], axis=-1)
    m = options.mask_size

    def crop():
        masks = _decode_masks(objects["mask"][:count])
        crops = crop_masks_to_boxes(masks, preimage, m)
        return tf.cond(flip, lambda: tf.reverse(crops, axis=[2]), lambda: crops)

    crops = tf.cond(count > 0, crop, lambda: tf.zeros([0, m, m], tf.float32))
    crops = tf.where(valid[:, None, None], crops, 0.0)
    if options.mask_dtype == "uint8":
        crops = tf.cast(crops >= 0.5, tf.uint8)

    features = {
        "gt_boxes": _pad_to(tf.where(valid[:, None], canvas_boxes, 0.0), options.max_instances),
        "gt_classes": _pad_to(tf.where(valid, tf.cast(objects["label"][:count], tf.int32), 0), options.max_instances),
        "gt_is_crowd": _pad_to(tf.logical_and(valid, objects["is_crowd"][:count]), options.max_instances),
        "gt_valid": _pad_to(valid, options.max_instances),
        "gt_masks": _pad_to(crops, options.max_instances),
    }
    if keypoint_flip is not None:
        num_keypoints = len(keypoint_flip)
        # Stored per object with its own shape; [n, K, 3] once stacked (a flat [0] when n = 0).
        keypoints = tf.reshape(objects["keypoints"], [tf.shape(objects["label"])[0], num_keypoints, 3])[:count]
        keypoints = transform_keypoints(keypoints, scale_yx, offset_yx, content_size, flip, keypoint_flip)
        keypoints = tf.where(valid[:, None, None], keypoints, 0.0)
        features["gt_keypoints"] = _pad_to(keypoints, options.max_instances)
    return features


def _random_geometry(original_hw: tf.Tensor, key: tf.Tensor, options: InputOptions):
    """(resized size, per-axis scale, crop offset, content size, flip) with draws from a stateless `key`."""
    jitter_key, crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
    lo, hi = options.scale_jitter
    jitter = tf.random.stateless_uniform([], jitter_key, minval=lo, maxval=hi) if hi > lo else tf.constant(lo)
    size = scaled_size(original_hw[0], original_hw[1],
                       resize_scale(original_hw[0], original_hw[1], options) * jitter, options.size_rounding)
    canvas = tf.constant(options.canvas_size, tf.int32)
    slack = tf.maximum(size - canvas, 0)
    offset = tf.cast(tf.floor(tf.random.stateless_uniform([2], crop_key) * tf.cast(slack + 1, tf.float32)), tf.int32)
    offset = tf.minimum(offset, slack)
    content_size = tf.minimum(size - offset, canvas)
    if options.random_flip:
        flip = tf.random.stateless_uniform([], flip_key) < 0.5
    else:
        flip = tf.constant(False)
    return size, offset, content_size, flip


def _image_features(example, image, original_hw, scale_yx, size, offset, content_size, flip, options,
                    canvas_size=None, normalize=True):
    """The features training and evaluation share: the canvas image (on `canvas_size`, default
    options.canvas_size) and what maps it back to the original."""
    return {
        "image": _image_to_canvas(image, size, offset, content_size, flip, options,
                                  canvas_size or options.canvas_size, normalize),
        "image_id": tf.cast(example["image_id"], tf.int64),
        "original_size": tf.cast(original_hw, tf.int32),
        "image_scale": scale_yx,
        "image_size": content_size,
    }


def train_example(example: Mapping[str, Any], key: tf.Tensor, options: InputOptions,
                  keypoint_flip: Sequence[int] | None = None) -> dict[str, tf.Tensor]:
    """A parsed dataset example (image and masks still encoded) -> fixed-shape training features.

    `key` is a stateless-RNG seed (int32/int64 [2]) that alone decides this example's jitter, crop and flip.
    `keypoint_flip` is the dataset's keypoint flip permutation (keypoints.flip_permutation; its length is K),
    or None for a dataset without keypoints (then there is no gt_keypoints).
    """
    image = decode_image(example["image"])
    original_hw = tf.shape(image)[:2]
    size, offset, content_size, flip = _random_geometry(original_hw, key, options)
    scale_yx = tf.cast(size, tf.float32) / tf.cast(original_hw, tf.float32)
    features = _image_features(example, image, original_hw, scale_yx, size, offset, content_size, flip, options,
                               normalize=options.train_image_dtype == "float32")
    features.update(crop_offset=tf.cast(offset, tf.float32), flipped=flip)
    features.update(_ground_truth(example["objects"], original_hw, scale_yx, offset, content_size, flip, options,
                                  keypoint_flip))
    return features


def eval_example(example: Mapping[str, Any], options: InputOptions, with_ground_truth: bool,
                 num_keypoints: int = 0, canvas_size: Sequence[int] | None = None,
                 size: tf.Tensor | Sequence[int] | None = None) -> dict[str, tf.Tensor]:
    """A parsed dataset example -> fixed-shape evaluation features: no jitter, no crop, no flip, the image resized
    to `size` (h, w) and padded to `canvas_size`. The pipeline passes both from its plan (pipeline.eval_geometry:
    image_resize.resized_size, the host's rule, and the fixed canvas or the example's padded canvas); by default
    they are the training graph's float32 resize and options.canvas_size. With ground truth and `num_keypoints`
    K > 0 the features include gt_keypoints."""
    canvas_size = tuple(int(v) for v in (canvas_size or options.canvas_size))
    image = decode_image(example["image"])
    original_hw = tf.shape(image)[:2]
    if size is None:
        size = scaled_size(original_hw[0], original_hw[1], resize_scale(original_hw[0], original_hw[1], options),
                           options.size_rounding)
    size = tf.cast(size, tf.int32)
    canvas = tf.constant(canvas_size, tf.int32)
    # Eval images always fit (checked in pipeline.eval_dataset); the minimum only guards rounding.
    content_size = tf.minimum(size, canvas)
    offset = tf.zeros([2], tf.int32)
    flip = tf.constant(False)
    scale_yx = tf.cast(size, tf.float32) / tf.cast(original_hw, tf.float32)
    features = _image_features(example, image, original_hw, scale_yx, size, offset, content_size, flip, options,
                               canvas_size)
    features["example_valid"] = tf.constant(True)
    if with_ground_truth:
        keypoint_flip = tuple(range(num_keypoints)) if num_keypoints else None  # never applied: no flip
        features.update(_ground_truth(example["objects"], original_hw, scale_yx, offset, content_size, flip, options,
                                      keypoint_flip))
    return features
