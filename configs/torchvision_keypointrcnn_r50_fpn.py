"""torchvision's Keypoint R-CNN R50-FPN with every setting its model uses.

The settings live in maskrcnn_jax/convert/configs/torchvision_keypointrcnn_r50_fpn.py, inside the package, because
the weight importer reads them when no --config is given.
"""

from maskrcnn_jax.convert.configs.torchvision_keypointrcnn_r50_fpn import get_config

__all__ = ["get_config"]
