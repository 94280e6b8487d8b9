"""Feature Pyramid Network (Lin et al., 2017) over ResNet C2..C5, and the ResNet-FPN backbone.

Variable names and their torchvision / detectron2 counterparts (conv kernels transpose [O, I, kh, kw] -> [kh, kw, I, O]):

  here                     torchvision (BackboneWithFPN)       detectron2 (FPN)
  body/...                 backbone.body.*  (see resnet.py)    backbone.bottom_up.*
  fpn/lateral{l}/kernel    backbone.fpn.inner_blocks.{l-2}.0   backbone.fpn_lateral{l}
  fpn/output{l}/kernel     backbone.fpn.layer_blocks.{l-2}.0   backbone.fpn_output{l}
  fpn/lateral{l}_norm/*    (none)                              backbone.fpn_lateral{l}.norm   (norm="gn" only)

P6 has no variables: it subsamples P5 (torchvision's LastLevelMaxPool, a kernel-1 stride-2 max-pool).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from maskrcnn_jax.layers.conv import Conv
from maskrcnn_jax.layers.norm import make_norm
from maskrcnn_jax.modeling.resnet import ResNet

# torchvision / detectron2 FPN init: kaiming_uniform_(a=1), i.e. uniform with variance 1 / fan_in; zero bias.
fpn_conv_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def nearest_source_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output row for PyTorch's F.interpolate(size=..., mode="nearest").

    PyTorch computes floor(dst * (in / out)) with a float32 scale, clamped to in - 1; done here at trace time.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(source, in_size - 1)


def _resize_axis_nearest(x, axis: int, out_size: int):
    in_size = x.shape[axis]
    source = nearest_source_indices(in_size, out_size)
    factor = -(-out_size // in_size)
    # The usual FPN case (out = 2 * in, or 2 * in - 1 for odd sizes) is a repeat plus a crop, cheaper than a gather.
    if np.array_equal(source, np.arange(out_size) // factor):
        return lax.slice_in_dim(jnp.repeat(x, factor, axis=axis), 0, out_size, axis=axis)
    return jnp.take(x, source, axis=axis)


def upsample_nearest(x, size: tuple[int, int]):
    """Resizes NHWC ``x`` to spatial ``size`` with the same pixel choice as PyTorch's nearest interpolation."""
    x = _resize_axis_nearest(x, 1, size[0])
    return _resize_axis_nearest(x, 2, size[1])


class FPN(nn.Module):
    """Top-down pathway with lateral 1x1 and output 3x3 convs, plus P6 by subsampling the top output.

    Call with {"c2": ..., "c5": ...} (any contiguous levels, NHWC); returns {"p2", ..., "p6"}: one more level than
    given, each with ``channels`` channels, at the input strides and twice the coarsest.

    Attributes:
      channels: output channels of every level (256 in the paper).
      norm: None (the paper, torchvision and detectron2's default: convs with bias) or "gn" (the GroupNorm paper's
        FPN: bias-free convs followed by GroupNorm).
      dtype: compute dtype; parameters stay float32.
    """

    channels: int = 256
    norm: str | None = None
    dtype: Any = jnp.float32

    def _conv(self, kernel, name):
        pad = kernel // 2
        conv = Conv(
            self.channels,
            (kernel, kernel),
            padding=((pad, pad), (pad, pad)),
            use_bias=self.norm is None,
            kernel_init=fpn_conv_init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name=name,
        )
        if self.norm is None:
            return conv
        norm = make_norm(self.norm, train=False, dtype=self.dtype, name=f"{name}_norm")
        return lambda x: norm(conv(x))

    @nn.compact
    def __call__(self, features: dict):
        if self.norm not in (None, "gn"):
            raise ValueError(f"FPN norm must be None or 'gn', got {self.norm!r}")
        levels = sorted(int(name[1:]) for name in features)
        if levels != list(range(levels[0], levels[-1] + 1)):
            raise ValueError(f"FPN needs contiguous levels, got {sorted(features)}")
        outputs = {}
        top_down = None
        for level in reversed(levels):
            lateral = self._conv(1, f"lateral{level}")(features[f"c{level}"].astype(self.dtype))
            if top_down is not None:
                lateral = lateral + upsample_nearest(top_down, lateral.shape[1:3])
            top_down = lateral
            outputs[f"p{level}"] = self._conv(3, f"output{level}")(lateral)
        top = levels[-1]
        outputs[f"p{top + 1}"] = outputs[f"p{top}"][:, ::2, ::2, :]
        return {f"p{level}": outputs[f"p{level}"] for level in range(levels[0], top + 2)}


class ResNetFPN(nn.Module):
    """ResNet body ("body") + FPN ("fpn"): images [B, H, W, 3] -> {"p2", ..., "p6"}, torchvision's
    ``resnet_fpn_backbone`` layout. See ResNet and FPN for the attributes."""

    depth: int = 50
    norm: str = "frozen_bn"
    norm_eps: float = 1e-5
    freeze_at: int = 0
    stride_in_1x1: bool = False
    groups: int = 1
    width_per_group: int = 64
    fpn_channels: int = 256
    fpn_norm: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        body = ResNet(
            depth=self.depth,
            norm=self.norm,
            norm_eps=self.norm_eps,
            freeze_at=self.freeze_at,
            stride_in_1x1=self.stride_in_1x1,
            groups=self.groups,
            width_per_group=self.width_per_group,
            dtype=self.dtype,
            name="body",
        )
        fpn = FPN(channels=self.fpn_channels, norm=self.fpn_norm, dtype=self.dtype, name="fpn")
        return fpn(body(images, train=train))
