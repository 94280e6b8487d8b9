"""The single-level backbones of the paper's Table 2: ResNet read at C4 (stride 16) or C5 (stride 32), no FPN.

  kind "c4": the body stops after layer3 and returns {"c4"}; res5 runs on RoIs instead (res5_head.py). The paper's
             and detectron2's R50-C4 / R101-C4.
  kind "c5": the whole body, returning {"c5"}: RPN and RoI pooling on res5's output, the setting of Table 2d where
             RoIAlign gains the most over RoIPool.

The body is named "body", as in ResNetFPN, so that a backbone import (torchvision or MSRA ImageNet ResNets) lands in
the same place for every kind.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from maskrcnn_jax.modeling.resnet import FEATURE_STRIDES, ResNet

# kind -> (the feature it returns, its number of residual stages)
SINGLE_LEVELS = {"c4": ("c4", 3), "c5": ("c5", 4)}


def single_level_stride(kind: str) -> int:
    """The one feature stride of a single-level backbone kind: 16 for "c4", 32 for "c5"."""
    return FEATURE_STRIDES[SINGLE_LEVELS[kind][0]]


class SingleLevelResNet(nn.Module):
    """ResNet body ("body") read at one level: images [B, H, W, 3] -> {"c4"} or {"c5"}. See ResNet for the
    attributes."""

    kind: str = "c4"
    depth: int = 50
    norm: str = "frozen_bn"
    norm_eps: float = 1e-5
    freeze_at: int = 0
    stride_in_1x1: bool = False
    groups: int = 1
    width_per_group: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        if self.kind not in SINGLE_LEVELS:
            raise ValueError(f"a single-level backbone is one of {sorted(SINGLE_LEVELS)}, got {self.kind!r}")
        feature, num_stages = SINGLE_LEVELS[self.kind]
        body = ResNet(
            depth=self.depth,
            norm=self.norm,
            norm_eps=self.norm_eps,
            freeze_at=self.freeze_at,
            stride_in_1x1=self.stride_in_1x1,
            groups=self.groups,
            width_per_group=self.width_per_group,
            num_stages=num_stages,
            dtype=self.dtype,
            name="body",
        )
        return {feature: body(images, train=train)[feature]}
