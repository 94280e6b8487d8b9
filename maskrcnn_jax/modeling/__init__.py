"""Flax Linen modules: the backbone (ResNet, FPN) and, later, the RPN, RoI heads and the MaskRCNN module."""

from maskrcnn_jax.modeling.fpn import FPN, ResNetFPN, upsample_nearest
from maskrcnn_jax.modeling.norm import BatchNorm, FrozenBatchNorm, GroupNorm, make_norm
from maskrcnn_jax.modeling.resnet import ResNet, frozen_names, frozen_param_mask, out_channels

__all__ = [
    "FPN",
    "BatchNorm",
    "FrozenBatchNorm",
    "GroupNorm",
    "ResNet",
    "ResNetFPN",
    "frozen_names",
    "frozen_param_mask",
    "make_norm",
    "out_channels",
    "upsample_nearest",
]
