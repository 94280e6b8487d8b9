"""The keypoint head (the paper's section 5, detectron2's KRCNNConvDeconvUpsampleHead, torchvision's
KeypointRCNNHeads + KeypointRCNNPredictor): each of K keypoint types is a one-hot mask on the RoI's m x m grid.

RoIAlign features [.., 14, 14, C] -> num_convs x (3x3 conv, conv_dim, ReLU) -> a 4x4 stride-2 transposed conv to K
channels at 28 x 28 -> bilinear x2 (half-pixel centres, as torch's interpolate with align_corners=False) -> K heatmap
logits at 56 x 56. Variable names follow detectron2 (`conv_fcn1..8`, `score_lowres`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.layers.deconv import ConvTranspose
from maskrcnn_jax.modeling.heads import conv_init, conv_relu_stack


def upsample_bilinear_2x(x):
    """[N, H, W, C] -> [N, 2H, 2W, C], bilinear with half-pixel centres and edge clamping (torch's interpolate,
    scale_factor=2, align_corners=False)."""
    n, h, w, c = x.shape
    return jax.image.resize(x, (n, 2 * h, 2 * w, c), method="linear", antialias=False)


class KeypointHead(nn.Module):
    num_keypoints: int
    conv_dim: int = 512
    num_convs: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, roi_features):
        """roi_features [..., R, m/4, m/4, C] -> heatmap logits [..., R, m, m, num_keypoints] (float32)."""
        lead = roi_features.shape[:-3]
        x = conv_relu_stack(roi_features.reshape(-1, *roi_features.shape[-3:]), self.num_convs, self.conv_dim,
                            "conv_fcn", self.dtype)
        # In training the head runs inside the RoI buckets' lax.switch (modeling/mask_rcnn.py).
        x = ConvTranspose(self.num_keypoints, 4, 2, 1, kernel_init=conv_init, dtype=self.dtype,
                          in_conditional_branch=True, name="score_lowres")(x)
        x = upsample_bilinear_2x(x.astype(jnp.float32))
        return x.reshape(*lead, *x.shape[1:])
