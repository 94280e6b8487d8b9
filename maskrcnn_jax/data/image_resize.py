"""The resize rule and the padded-canvas rule, written once for the input pipelines and the NumPy serving host.

Evaluation and inference use `resized_size`, on Python ints and floats: the peers compute an image's resized size
with Python floats (float64), and so does this, step for step (torchvision's GeneralizedRCNNTransform with "floor",
detectron2's ResizeShortestEdge with "half_up"), so an image gets the peer's size to the pixel. The evaluation
pipeline plans its batches with it from the stored image sizes, before reading any pixels, and the host calls it on
each image, so the two put an image on the canvas at the same size. `padded_canvas` then gives the canvas of that
size, for both.

Training resizes in the TensorFlow graph, where the scale is jittered: `resize_scale` and `whole_size` take an array
namespace `xp` (`tf.math`) on float32 values. Without jitter they give the same size except where float32 rounding
moves a side across a whole pixel.

This module imports nothing, so that it can be copied next to an exported model with serving/host.py.
"""

# How the resized size is made whole: "round" (half to even, the TF Model Garden's rounding), "floor"
# (torchvision's GeneralizedRCNNTransform: floor(side * scale)) or "half_up" (detectron2's ResizeShortestEdge:
# int(side + 0.5) after its own steps, see resized_size).
SIZE_ROUNDINGS = ("round", "floor", "half_up")


def _check_rounding(rounding):
    if rounding not in SIZE_ROUNDINGS:
        raise ValueError(f"size_rounding must be one of {SIZE_ROUNDINGS}, got {rounding!r}")


def resize_scale(height, width, canvas_size, short_side, long_side_max, xp):
    """The scale factor of an image of float32 (height, width) before jitter: the short side to `short_side` unless
    the long side would exceed `long_side_max` (detectron2's ResizeShortestEdge), or, with short_side None, the
    largest scale that fits `canvas_size` (the TF Model Garden's square canvas)."""
    if short_side is not None:
        return xp.minimum(short_side / xp.minimum(height, width), long_side_max / xp.maximum(height, width))
    canvas_h, canvas_w = canvas_size
    return xp.minimum(canvas_h / height, canvas_w / width)


def whole_size(exact, rounding, xp):
    """A float32 resized side (or sides) made whole by `rounding` (SIZE_ROUNDINGS), at least 1 pixel; still float."""
    _check_rounding(rounding)
    if rounding == "floor":
        whole = xp.floor(exact)
    elif rounding == "half_up":
        whole = xp.floor(exact + 0.5)
    else:
        whole = xp.round(exact)
    return xp.maximum(whole, 1.0)


def resized_size(height, width, canvas_size, short_side, long_side_max, rounding):
    """(h, w) ints of an image of (height, width) pixels resized for evaluation and inference, in Python floats.

    The scale takes the short side to `short_side` unless the long side would exceed `long_side_max`, or, with
    short_side None, is the largest that fits `canvas_size`. "floor" and "round" compute scale = min(short_side /
    short, long_side_max / long) and floor or round (half to even) side * scale, as torchvision does for "floor"
    (math.floor(float(side) * scale) in F.interpolate). "half_up" takes detectron2's steps: the short side becomes
    short_side itself and the long side scale * long; if the long side then exceeds long_side_max, both are
    multiplied by long_side_max / long side; each is made whole by int(side + 0.5). Each side is at least 1."""
    _check_rounding(rounding)
    height, width = int(height), int(width)
    if short_side is None:
        scale = min(canvas_size[0] / height, canvas_size[1] / width)
        exact = (height * scale, width * scale)
    elif rounding == "half_up":
        scale = short_side * 1.0 / min(height, width)
        exact = (short_side * 1.0, scale * width) if height < width else (scale * height, short_side * 1.0)
        if max(exact) > long_side_max:
            scale = long_side_max * 1.0 / max(exact)
            exact = (exact[0] * scale, exact[1] * scale)
    else:
        scale = min(short_side / min(height, width), long_side_max / max(height, width))
        exact = (float(height) * scale, float(width) * scale)
    if rounding == "floor":
        whole = [int(side // 1) for side in exact]
    elif rounding == "half_up":
        whole = [int(side + 0.5) for side in exact]
    else:
        whole = [round(side) for side in exact]
    return max(whole[0], 1), max(whole[1], 1)


# ----------------------------------------------------------------------------------------------------
# The canvas an image is padded to at inference and evaluation.

# "fixed": every image on the one data.canvas_size canvas (training's canvas: one compile serves every image);
# "padded": each image's resized size padded up to a multiple of size_divisibility, as torchvision's
# GeneralizedRCNNTransform and detectron2's ImageList pad a batch of one (one compile per distinct canvas).
EVAL_CANVASES = ("fixed", "padded")


def check_padding(size_divisibility, step=0, sides=()):
    """ValueError unless size_divisibility >= 1, step is 0 or a multiple of it, and sides (the bucket list) are
    increasing multiples of it."""
    if int(size_divisibility) < 1:
        raise ValueError(f"size_divisibility must be positive, got {size_divisibility}")
    if step and (int(step) < 0 or int(step) % int(size_divisibility)):
        raise ValueError(f"eval_canvas_step must be 0 or a positive multiple of size_divisibility "
                         f"{size_divisibility}, got {step}")
    sides = [int(s) for s in sides]
    if any(s <= 0 or s % int(size_divisibility) for s in sides) or sides != sorted(set(sides)):
        raise ValueError(f"eval_canvas_sides must be increasing positive multiples of size_divisibility "
                         f"{size_divisibility}, got {tuple(sides)}")


def padded_side(side, size_divisibility, step=0, sides=()):
    """One side of the padded canvas (a whole int): `side` rounded up to a multiple of size_divisibility (the
    peers' rule), then, to bound the number of distinct canvases, to the smallest of `sides` that holds it, else
    (beyond the largest, or without `sides`) up to a multiple of `step` when step > 0."""
    divisor = int(size_divisibility)
    padded = -(-int(side) // divisor) * divisor
    for bucket in sides:
        if int(bucket) >= padded:
            return int(bucket)
    if step:
        padded = -(-padded // int(step)) * int(step)
    return padded


def padded_canvas(image_size, size_divisibility, step=0, sides=()):
    """(height, width) of the canvas for an image resized to `image_size` (h, w), by padded_side per axis."""
    return tuple(padded_side(s, size_divisibility, step, sides) for s in image_size)
