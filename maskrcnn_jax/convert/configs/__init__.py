"""The configs that describe each peer library's model, inside the package so that an installed importer finds them.
configs/torchvision_maskrcnn_r50_fpn.py, configs/torchvision_keypointrcnn_r50_fpn.py,
configs/detectron2_maskrcnn_r50_fpn.py and configs/detectron2_maskrcnn_r50_c4.py are these, for the command line."""

import ml_collections

from maskrcnn_jax.convert.configs import (
    detectron2_maskrcnn_r50_c4,
    detectron2_maskrcnn_r50_fpn,
    torchvision_keypointrcnn_r50_fpn,
    torchvision_maskrcnn_r50_fpn,
)

DEFAULT_CONFIGS = {
    "torchvision": torchvision_maskrcnn_r50_fpn,
    "torchvision_keypoints": torchvision_keypointrcnn_r50_fpn,
    "detectron2": detectron2_maskrcnn_r50_fpn,
    "detectron2_c4": detectron2_maskrcnn_r50_c4,
}
SOURCES = ("torchvision", "detectron2")


def default_config(source: str) -> ml_collections.ConfigDict:
    """get_config() of the model a checkpoint comes from: 'torchvision' (Mask R-CNN), 'torchvision_keypoints'
    (Keypoint R-CNN), 'detectron2' (R50-FPN) or 'detectron2_c4' (R50-C4)."""
    return DEFAULT_CONFIGS[source].get_config()
