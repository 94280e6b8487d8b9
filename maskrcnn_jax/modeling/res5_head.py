"""The C4 model's RoI feature extractor: ResNet's fifth stage (res5) run on each RoI's pooled C4 features.

The paper's ResNet-C4 head (Figure 4, left; detectron2's Res5ROIHeads): RoIAlign 14 x 14 on C4 (stride 16), then
res5 with its stride 2 in the first block, giving 7 x 7 x 2048 per RoI. The box head averages that over space
(heads.GlobalPoolBoxHead); the mask head upsamples it (heads.FCNMaskHead with no convs: a 2 x 2 transposed conv to
14 x 14, then one mask per class). Both read the same res5 output, as in detectron2.

The stage is built like the backbone's own fourth stage (same block kind, blocks, norm, stride_in_1x1 and ResNeXt
groups), so ImageNet weights of ``layer4`` fit it. Its variables are ``res5/block_{b}/...`` with resnet.py's
names; detectron2's ``roi_heads.res5.{b}.*`` map to them as its ``backbone.bottom_up.res5.{b}.*`` map to
``backbone/body/layer4/block_{b}/*``.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from maskrcnn_jax.modeling.resnet import RESNET_STAGES, residual_blocks

RES5_PLANES = 512  # the fifth stage's bottleneck planes: 512 x 4 = 2048 output channels for ResNet-50 and deeper


class Res5Head(nn.Module):
    """res5 on RoI features: [..., R, S, S, C4 channels] -> [..., R, ceil(S / 2), ceil(S / 2), C5 channels].

    Attributes are the backbone's (see resnet.ResNet). ``train`` at call time drives ``bn`` layers as in the body;
    freeze_at never freezes it (detectron2 freezes backbone stages only).
    """

    depth: int = 50
    norm: str = "frozen_bn"
    norm_eps: float = 1e-5
    stride_in_1x1: bool = False
    groups: int = 1
    width_per_group: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, roi_features, train: bool = False):
        if self.depth not in RESNET_STAGES:
            raise ValueError(f"depth must be one of {sorted(RESNET_STAGES)}, got {self.depth}")
        block_kind, blocks_per_stage = RESNET_STAGES[self.depth]
        lead = roi_features.shape[:-3]
        x = roi_features.reshape(-1, *roi_features.shape[-3:]).astype(self.dtype)
        x = residual_blocks(
            x,
            block_kind=block_kind,
            num_blocks=blocks_per_stage[-1],
            planes=RES5_PLANES,
            stride=2,
            stride_in_1x1=self.stride_in_1x1,
            groups=self.groups,
            width_per_group=self.width_per_group,
            norm=self.norm,
            norm_eps=self.norm_eps,
            train=train,
            dtype=self.dtype,
        )
        return x.reshape(*lead, *x.shape[1:])
