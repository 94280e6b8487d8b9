"""Flax Linen modules: the backbones (ResNet / ResNeXt with FPN, or read at C4 or C5), the RPN, the RoI heads (with
res5 as the C4 head) and the MaskRCNN module."""

from maskrcnn_jax.modeling.defaults import model_config
from maskrcnn_jax.modeling.fpn import FPN, ResNetFPN, upsample_nearest
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN, build_model, mask_size
from maskrcnn_jax.modeling.res5_head import Res5Head
from maskrcnn_jax.modeling.resnet import ResNet, frozen_names, frozen_param_mask, out_channels
from maskrcnn_jax.modeling.single_level import SingleLevelResNet

__all__ = [
    "FPN",
    "MaskRCNN",
    "Res5Head",
    "ResNet",
    "ResNetFPN",
    "SingleLevelResNet",
    "build_model",
    "frozen_names",
    "frozen_param_mask",
    "mask_size",
    "model_config",
    "out_channels",
    "upsample_nearest",
]
