"""Keep TensorFlow on the host: tf.data and TFDS run on the CPU, and JAX owns every accelerator."""

import tensorflow as tf


def hide_accelerators_from_tensorflow() -> None:
    """Make GPUs and TPUs invisible to TensorFlow so it never claims accelerator memory. Call before
    TensorFlow touches a device; later calls (and machines without such devices) are no-ops."""
    for device_type in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], device_type)
        except (RuntimeError, ValueError):
            pass  # already initialised, or no such device type
