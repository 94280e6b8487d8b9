"""ResNet (He et al., 2016) and ResNeXt (Xie et al., 2017) bodies returning the C2..C5 feature maps, NHWC.

ResNeXt is the same bottleneck with a grouped 3x3 conv: ``groups`` x ``width_per_group`` channels in the 1x1 and
3x3 convs of the first stage, doubling each stage (X50-32x4d: groups=32, width_per_group=4; X101-32x8d: 32, 8), as
torchvision's resnext50_32x4d / resnext101_32x8d and detectron2's NUM_GROUPS / WIDTH_PER_GROUP. ResNet is
groups=1, width_per_group=64.

Variable names follow torchvision's state dict so that a weight import is a rename plus a transpose:

  torchvision                         here (``params`` / ``batch_stats``)
  conv1.weight [O, I, kh, kw]         conv1/kernel [kh, kw, I, O]
  bn1.{weight,bias,running_*}         bn1/{weight,bias,running_*}        (same names for every norm; see norm.py)
  layer{s}.{b}.conv{k}.weight         layer{s}/block_{b}/conv{k}/kernel
  layer{s}.{b}.bn{k}.*                layer{s}/block_{b}/bn{k}/*
  layer{s}.{b}.downsample.0.weight    layer{s}/block_{b}/downsample_conv/kernel
  layer{s}.{b}.downsample.1.*         layer{s}/block_{b}/downsample_bn/*

detectron2 names map the same way: stem.conv1 -> conv1 (its .norm -> bn1), res{s+1} -> layer{s},
conv{k}.norm -> bn{k}, shortcut -> downsample_conv (shortcut.norm -> downsample_bn). MSRA/detectron2 weights put the
stride in the first 1x1 conv of a bottleneck: build them with ``stride_in_1x1=True``.

Padding is explicit and symmetric (7x7/2 pad 3, 3x3 max-pool/2 pad 1 with -inf, 3x3 convs pad 1), as in PyTorch;
'SAME' would pad stride-2 layers asymmetrically and shift every feature map by a pixel.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.layers.activation import bit_mask_relu
from maskrcnn_jax.layers.conv import Conv
from maskrcnn_jax.layers.norm import make_norm
from maskrcnn_jax.layers.pooling import max_pool

# depth -> (block type, blocks per stage layer1..layer4)
RESNET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STEM_NAMES = ("conv1", "bn1")
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")
# Output feature names and their strides relative to the input.
FEATURE_STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}

# torchvision's resnet init: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated normal.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def out_channels(depth: int) -> dict[str, int]:
    """Channels of C2..C5 for a ResNet of this depth."""
    block, _ = RESNET_STAGES[depth]
    expansion = 4 if block == "bottleneck" else 1
    return {name: 64 * 2**i * expansion for i, name in enumerate(FEATURE_STRIDES)}


def frozen_names(freeze_at: int) -> tuple[str, ...]:
    """Top-level ResNet variable names frozen by ``freeze_at`` (detectron2: 1 = stem, 2 = stem + layer1, ...)."""
    if not 0 <= freeze_at <= 5:
        raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
    if freeze_at == 0:
        return ()
    return STEM_NAMES + STAGE_NAMES[: freeze_at - 1]


def frozen_param_mask(resnet_params, freeze_at: int):
    """A pytree of bools shaped like ``resnet_params`` (the ResNet's own ``params`` subtree): True where frozen.

    The forward pass already stops gradients at the frozen stages' outputs, so their gradients are zero; the mask
    keeps the optimizer from moving them anyway (decoupled weight decay would), e.g. ``optax.masked`` with its
    negation or ``optax.multi_transform``.
    """
    frozen = set(frozen_names(freeze_at))
    return {
        name: jax.tree_util.tree_map(lambda _, is_frozen=name in frozen: is_frozen, subtree)
        for name, subtree in resnet_params.items()
    }


def relu_after(norm: str):
    """The ReLU to put after this norm: bit_mask_relu after FrozenBN, which keeps nothing for its backward, so that
    the conv output need not be kept either; nn.relu after BN and GN, whose backward keeps it anyway."""
    return bit_mask_relu if norm == "frozen_bn" else nn.relu


def _conv(features, kernel, stride, dtype, name, groups=1):
    # Symmetric padding kernel // 2 on both sides, as PyTorch (7x7 -> 3, 3x3 -> 1, 1x1 -> 0).
    pad = kernel // 2
    return Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs; the stride sits in the first. ``stride_in_1x1``, ``groups`` and ``width_per_group`` do not
    apply (as in torchvision, which rejects ResNeXt basic blocks)."""

    planes: int
    stride: int = 1
    norm: str = "frozen_bn"
    norm_eps: float = 1e-5
    train: bool = False
    dtype: Any = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x):
        def norm(name):
            return make_norm(self.norm, train=self.train, eps=self.norm_eps, dtype=self.dtype, name=name)

        relu = relu_after(self.norm)
        out = relu(norm("bn1")(_conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)))
        out = norm("bn2")(_conv(self.planes, 3, 1, self.dtype, "conv2")(out))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            shortcut = norm("downsample_bn")(_conv(self.planes, 1, self.stride, self.dtype, "downsample_conv")(x))
        return relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4). The stride sits in the 3x3 (torchvision) or, with ``stride_in_1x1``, in
    the first 1x1 (MSRA / detectron2). The 1x1 and 3x3 convs have planes * width_per_group / 64 * groups channels
    (torchvision's width), and the 3x3 is grouped."""

    planes: int
    stride: int = 1
    stride_in_1x1: bool = False
    groups: int = 1
    width_per_group: int = 64
    norm: str = "frozen_bn"
    norm_eps: float = 1e-5
    train: bool = False
    dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x):
        def norm(name):
            return make_norm(self.norm, train=self.train, eps=self.norm_eps, dtype=self.dtype, name=name)

        stride_1x1, stride_3x3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        out_planes = self.planes * self.expansion
        width = self.planes * self.width_per_group // 64 * self.groups
        relu = relu_after(self.norm)
        out = relu(norm("bn1")(_conv(width, 1, stride_1x1, self.dtype, "conv1")(x)))
        out = relu(norm("bn2")(_conv(width, 3, stride_3x3, self.dtype, "conv2", self.groups)(out)))
        out = norm("bn3")(_conv(out_planes, 1, 1, self.dtype, "conv3")(out))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_planes:
            shortcut = norm("downsample_bn")(_conv(out_planes, 1, self.stride, self.dtype, "downsample_conv")(x))
        return relu(out + shortcut)


def residual_blocks(x, *, block_kind, num_blocks, planes, stride, stride_in_1x1=False, groups=1,
                    width_per_group=64, norm="frozen_bn", norm_eps=1e-5, train=False, dtype=jnp.float32):
    """``num_blocks`` residual blocks named block_0, block_1, ... in the calling compact module; the first one
    carries the stride. Shared by a ResNet stage and the res5 RoI head (res5_head.py)."""
    if block_kind == "basic" and (groups, width_per_group) != (1, 64):
        raise ValueError(f"grouped convs (ResNeXt) need bottleneck blocks, got groups={groups}, "
                         f"width_per_group={width_per_group} with basic blocks")
    for index in range(num_blocks):
        common = dict(
            planes=planes,
            stride=stride if index == 0 else 1,
            norm=norm,
            norm_eps=norm_eps,
            train=train,
            dtype=dtype,
            name=f"block_{index}",
        )
        if block_kind == "bottleneck":
            x = Bottleneck(stride_in_1x1=stride_in_1x1, groups=groups, width_per_group=width_per_group, **common)(x)
        else:
            x = BasicBlock(**common)(x)
    return x


class ResNetStage(nn.Module):
    """``num_blocks`` residual blocks named block_0, block_1, ...; the first one carries the stride."""

    block_kind: str
    num_blocks: int
    planes: int
    stride: int
    stride_in_1x1: bool = False
    groups: int = 1
    width_per_group: int = 64
    norm: str = "frozen_bn"
    norm_eps: float = 1e-5
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return residual_blocks(
            x, block_kind=self.block_kind, num_blocks=self.num_blocks, planes=self.planes, stride=self.stride,
            stride_in_1x1=self.stride_in_1x1, groups=self.groups, width_per_group=self.width_per_group,
            norm=self.norm, norm_eps=self.norm_eps, train=self.train, dtype=self.dtype)


class ResNet(nn.Module):
    """ResNet-{18,34,50,101,152} (or ResNeXt) body without the classifier.

    Attributes:
      depth: one of RESNET_STAGES.
      groups, width_per_group: ResNeXt's cardinality and channels per group (1, 64: plain ResNet).
      num_stages: residual stages built, layer1..layer{num_stages}: 4 returns C2..C5; 3 stops at C4 (the C4
        backbone, whose fifth stage runs on RoIs, see res5_head.py).
      norm: "frozen_bn" | "bn" | "gn" (see norm.py for where their variables live).
      norm_eps: epsilon of every norm layer (1e-5 in torchvision and detectron2).
      freeze_at: 0 = nothing frozen, 1 = stem, 2 = stem + layer1, ... 5 = everything. Gradients stop at the output
        of the last frozen stage, and ``bn`` layers in frozen stages use their running statistics (detectron2 turns
        them into FrozenBatchNorm).
      stride_in_1x1: put a bottleneck's stride in its first 1x1 conv instead of the 3x3.
      dtype: compute dtype; parameters stay float32.

    Call with images [B, H, W, 3] and ``train``; returns {"c2", "c3", "c4", "c5"} at strides 4, 8, 16, 32.
    """

    depth: int = 50
    norm: str = "frozen_bn"
    norm_eps: float = 1e-5
    freeze_at: int = 0
    stride_in_1x1: bool = False
    groups: int = 1
    width_per_group: int = 64
    num_stages: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        if self.depth not in RESNET_STAGES:
            raise ValueError(f"depth must be one of {sorted(RESNET_STAGES)}, got {self.depth}")
        if not 1 <= self.num_stages <= len(STAGE_NAMES):
            raise ValueError(f"num_stages must be in 1..{len(STAGE_NAMES)}, got {self.num_stages}")
        block_kind, blocks_per_stage = RESNET_STAGES[self.depth]
        frozen = set(frozen_names(self.freeze_at))

        def stage_train(name):
            return train and name not in frozen

        x = images.astype(self.dtype)
        x = _conv(64, 7, 2, self.dtype, "conv1")(x)
        x = make_norm(self.norm, train=stage_train("bn1"), eps=self.norm_eps, dtype=self.dtype, name="bn1")(x)
        x = relu_after(self.norm)(x)
        x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
        if self.freeze_at >= 1:
            x = jax.lax.stop_gradient(x)

        features = {}
        for stage_index, (stage_name, feature_name, num_blocks) in enumerate(
            zip(STAGE_NAMES[: self.num_stages], FEATURE_STRIDES, blocks_per_stage)
        ):
            x = ResNetStage(
                block_kind=block_kind,
                num_blocks=num_blocks,
                planes=64 * 2**stage_index,
                stride=1 if stage_index == 0 else 2,
                stride_in_1x1=self.stride_in_1x1,
                groups=self.groups,
                width_per_group=self.width_per_group,
                norm=self.norm,
                norm_eps=self.norm_eps,
                train=stage_train(stage_name),
                dtype=self.dtype,
                name=stage_name,
            )(x)
            if self.freeze_at >= stage_index + 2:
                x = jax.lax.stop_gradient(x)
            features[feature_name] = x
        return features
