"""The device side of the input: uint8 canvases normalised where the step runs, so the host sends a quarter of the
bytes."""

import jax.numpy as jnp


def normalize_canvas(images, image_sizes, pixel_mean, pixel_std):
    """uint8 canvases [B, H, W, C] with each image in its top-left `image_sizes` [B, 2] window -> float32
    (pixel - mean) / std inside the window and exactly 0 outside it, as the host normalises before padding (and as
    detectron2 and torchvision pad after normalising). Float canvases are already normalised and pass unchanged."""
    if images.dtype != jnp.uint8:
        return images
    mean = jnp.asarray(pixel_mean, jnp.float32)
    std = jnp.asarray(pixel_std, jnp.float32)
    normalized = (images.astype(jnp.float32) - mean) / std
    rows = jnp.arange(images.shape[1])[None, :, None] < image_sizes[:, 0, None, None]
    columns = jnp.arange(images.shape[2])[None, None, :] < image_sizes[:, 1, None, None]
    return jnp.where((rows & columns)[..., None], normalized, 0.0)
