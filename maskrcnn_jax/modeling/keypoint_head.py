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

from maskrcnn_jax.layers.conv import Conv
from maskrcnn_jax.layers.deconv import ConvTranspose

# torchvision and detectron2 both use He (MSRA) initialisation, fan_out, with zero biases.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


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
        x = roi_features.reshape(-1, *roi_features.shape[-3:])
        for i in range(self.num_convs):
            x = Conv(self.conv_dim, (3, 3), padding=1, kernel_init=conv_init, dtype=self.dtype,
                     name=f"conv_fcn{i + 1}")(x)
            x = nn.relu(x)
        x = ConvTranspose(self.num_keypoints, 4, 2, 1, kernel_init=conv_init, dtype=self.dtype,
                          name="score_lowres")(x)
        x = upsample_bilinear_2x(x.astype(jnp.float32))
        return x.reshape(*lead, *x.shape[1:])
