"""Anchor boxes for the FPN levels of a padded input image (torchvision AnchorGenerator values and order)."""

import functools
import math

import jax.numpy as jnp
import numpy as np


def feature_map_size(image_size, stride):
    """Spatial size of the level with `stride`: every stride-2 conv / pool of ResNet-FPN rounds up."""
    height, width = image_size
    return math.ceil(height / stride), math.ceil(width / stride)


def cell_anchors(size, aspect_ratios):
    """The A anchors centred on (0, 0) for one size, rounded to integers as torchvision does."""
    ratios = np.asarray(aspect_ratios, np.float32)
    height_ratios = np.sqrt(ratios)
    width_ratios = np.float32(1) / height_ratios
    widths = width_ratios * np.float32(size)
    heights = height_ratios * np.float32(size)
    return np.round(np.stack([-widths, -heights, widths, heights], axis=1) / np.float32(2))


def generate_anchors(
    image_size,
    strides=(4, 8, 16, 32, 64),
    sizes=(32, 64, 128, 256, 512),
    aspect_ratios=(0.5, 1.0, 2.0),
):
    """One [H_l * W_l * A, 4] float32 array of xyxy anchors per level, location-major then aspect ratio.

    `image_size` is the padded (height, width). The grid step is `image_size // grid_size` per axis, exactly
    as torchvision computes it; it differs from the nominal stride only when the image is not a multiple of
    the stride (e.g. P6 of an 800-pixel side), which keeps us equal to torchvision's pretrained models.
    """
    levels = _anchors_for_shape(tuple(image_size), tuple(strides), tuple(sizes), tuple(aspect_ratios))
    return [jnp.asarray(anchors) for anchors in levels]


@functools.lru_cache(maxsize=32)
def _anchors_for_shape(image_size, strides, sizes, aspect_ratios):
    """NumPy anchors per static shape, cached so that retraces do not rebuild ~270k boxes. They stay NumPy:
    a cached jax.Array captured by a later trace becomes a hoisted constant argument of that computation."""
    if len(strides) != len(sizes):
        raise ValueError(f"one anchor size per level: got {len(sizes)} sizes for {len(strides)} strides")
    height, width = image_size
    levels = []
    for stride, size in zip(strides, sizes):
        grid_h, grid_w = feature_map_size(image_size, stride)
        step_y, step_x = height // grid_h, width // grid_w
        shift_x = np.arange(grid_w, dtype=np.float32) * np.float32(step_x)
        shift_y = np.arange(grid_h, dtype=np.float32) * np.float32(step_y)
        base = cell_anchors(size, aspect_ratios)
        anchors = np.empty((grid_h, grid_w, len(base), 4), np.float32)
        anchors[..., 0::2] = shift_x[None, :, None, None] + base[None, None, :, 0::2]
        anchors[..., 1::2] = shift_y[:, None, None, None] + base[None, None, :, 1::2]
        levels.append(anchors.reshape(-1, 4))
    return tuple(levels)
