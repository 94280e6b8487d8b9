"""The resize rule, written once for the TensorFlow input pipeline and the NumPy serving host.

Both call these functions with their own array namespace `xp` (`tf.math` or `numpy`) on float32 scalars, so the
evaluation pipeline and the Predictor put an image of the same size on the canvas at the same size, to the bit.
This module imports nothing, so that it can be copied next to an exported model with serving/host.py.
"""

# How the resized size is made whole: "round" (half to even; detectron2 and the TF Model Garden round) or "floor"
# (torchvision's GeneralizedRCNNTransform, int(h * scale)).
SIZE_ROUNDINGS = ("round", "floor")


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
    if rounding not in SIZE_ROUNDINGS:
        raise ValueError(f"size_rounding must be one of {SIZE_ROUNDINGS}, got {rounding!r}")
    return xp.maximum(xp.floor(exact) if rounding == "floor" else xp.round(exact), 1.0)
