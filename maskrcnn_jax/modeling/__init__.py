"""Flax Linen modules: the backbone (ResNet, FPN), the RPN, the RoI heads and the MaskRCNN module."""

from maskrcnn_jax.modeling.defaults import model_config
from maskrcnn_jax.modeling.fpn import FPN, ResNetFPN, upsample_nearest
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN, build_model
from maskrcnn_jax.modeling.resnet import ResNet, frozen_names, frozen_param_mask, out_channels

__all__ = [
    "FPN",
    "MaskRCNN",
    "ResNet",
    "ResNetFPN",
    "build_model",
    "frozen_names",
    "frozen_param_mask",
    "model_config",
    "out_channels",
    "upsample_nearest",
]
