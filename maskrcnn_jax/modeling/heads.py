"""The box heads and the mask heads: parameters and wiring only (their losses and sampling are in roi_heads.py).

Variable names follow torchvision's state dict (`fc6`, `fc7`, `cls_score`, `bbox_pred`, `mask_fcn1..4`, `conv5_mask`,
`mask_fcn_logits`), so a weight import is a rename plus a transpose.

Two box heads, as the paper's Figure 4 draws them: `BoxHead` (right, FPN and C5: two FCs on 7 x 7 RoI features) and
`GlobalPoolBoxHead` (left, C4: the res5 output averaged over space). The FCN mask head serves both: 4 convs on
14 x 14 RoI features (FPN, C5), or none on the 7 x 7 res5 output (C4); its transposed conv doubles the side either
way, so the masks are 28 x 28 or 14 x 14.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from maskrcnn_jax.layers.activation import bit_mask_relu
from maskrcnn_jax.layers.conv import BranchConv
from maskrcnn_jax.layers.deconv import Deconv2x2

# detectron2's initialisations: c2_xavier_fill for FCs, c2_msra_fill for convs, small normals for predictors.
fc_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BoxHead(nn.Module):
    """Two shared FC layers, then class logits and class-specific box deltas (torchvision TwoMLPHead +
    FastRCNNPredictor: `fc6`, `fc7`, `cls_score`, `bbox_pred`)."""

    num_classes: int
    fc_dim: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, roi_features):
        """roi_features [..., R, 7, 7, C] -> logits [..., R, num_classes], deltas [..., R, num_classes, 4]."""
        x = roi_features.reshape(*roi_features.shape[:-3], -1)
        x = bit_mask_relu(nn.Dense(self.fc_dim, kernel_init=fc_init, dtype=self.dtype, name="fc6")(x))
        x = bit_mask_relu(nn.Dense(self.fc_dim, kernel_init=fc_init, dtype=self.dtype, name="fc7")(x))
        logits = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype, name="cls_score"
        )(x)
        deltas = nn.Dense(
            4 * self.num_classes, kernel_init=nn.initializers.normal(0.001), dtype=self.dtype, name="bbox_pred"
        )(x)
        return logits.astype(jnp.float32), deltas.reshape(*deltas.shape[:-1], self.num_classes, 4).astype(jnp.float32)


class GlobalPoolBoxHead(nn.Module):
    """The C4 box head after res5 (detectron2's Res5ROIHeads predictor): average over the RoI's 7 x 7 res5 output,
    then class logits and class-specific box deltas (`cls_score`, `bbox_pred`, named as BoxHead's)."""

    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, roi_features):
        """roi_features [..., R, S, S, C] -> logits [..., R, num_classes], deltas [..., R, num_classes, 4]."""
        x = jnp.mean(roi_features.astype(jnp.float32), axis=(-3, -2)).astype(self.dtype)
        logits = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype, name="cls_score"
        )(x)
        deltas = nn.Dense(
            4 * self.num_classes, kernel_init=nn.initializers.normal(0.001), dtype=self.dtype, name="bbox_pred"
        )(x)
        return logits.astype(jnp.float32), deltas.reshape(*deltas.shape[:-1], self.num_classes, 4).astype(jnp.float32)


def conv_relu_stack(x, count: int, features: int, name: str, dtype):
    """`count` x (3x3 conv of `features` channels, ReLU), the convs named {name}1..{name}{count}: the towers of the
    mask and keypoint heads. Call it from a compact module's __call__, which then owns the convs. They are
    BranchConv: in training the heads run inside the RoI buckets' lax.switch (modeling/mask_rcnn.py)."""
    for i in range(count):
        conv = BranchConv(features, (3, 3), padding=1, kernel_init=conv_init, dtype=dtype, name=f"{name}{i + 1}")
        x = bit_mask_relu(conv(x))
    return x


class FCNMaskHead(nn.Module):
    """The paper's FCN mask head: num_convs x (3x3 conv, 256, ReLU), a 2x2 stride-2 deconv, then a 1x1 conv to one
    mask per class (torchvision MaskRCNNHeads + MaskRCNNPredictor: `mask_fcn1..4`, `conv5_mask`, `mask_fcn_logits`).
    num_convs=0 is the C4 head on res5 features (detectron2's MaskRCNNConvUpsampleHead with NUM_CONV 0)."""

    num_masks: int
    conv_dim: int = 256
    num_convs: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, roi_features):
        """roi_features [..., R, S, S, C] -> mask logits [..., R, 2S, 2S, num_masks] (S = 14 on FPN, 7 on C4)."""
        lead = roi_features.shape[:-3]
        x = conv_relu_stack(roi_features.reshape(-1, *roi_features.shape[-3:]), self.num_convs, self.conv_dim,
                            "mask_fcn", self.dtype)
        x = Deconv2x2(self.conv_dim, kernel_init=conv_init, dtype=self.dtype, name="conv5_mask")(x)
        x = bit_mask_relu(x)
        x = BranchConv(self.num_masks, (1, 1), kernel_init=nn.initializers.normal(0.001), dtype=self.dtype,
                 name="mask_fcn_logits")(x)
        return x.reshape(*lead, *x.shape[1:]).astype(jnp.float32)


class MLPMaskHead(nn.Module):
    """The paper's MLP ablation (Table 2e): fc 1024 -> fc 1024 -> num_masks x mask_size x mask_size (28), no spatial
    layout."""

    num_masks: int
    fc_dim: int = 1024
    mask_size: int = 28
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, roi_features):
        x = roi_features.reshape(*roi_features.shape[:-3], -1)
        x = bit_mask_relu(nn.Dense(self.fc_dim, kernel_init=fc_init, dtype=self.dtype, name="fc1")(x))
        x = bit_mask_relu(nn.Dense(self.fc_dim, kernel_init=fc_init, dtype=self.dtype, name="fc2")(x))
        x = nn.Dense(self.mask_size * self.mask_size * self.num_masks, kernel_init=nn.initializers.normal(0.001),
                     dtype=self.dtype, name="mask_logits")(x)
        return x.reshape(*x.shape[:-1], self.mask_size, self.mask_size, self.num_masks).astype(jnp.float32)
