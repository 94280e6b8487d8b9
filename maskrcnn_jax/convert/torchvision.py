"""torchvision checkpoints -> our Flax variables.

Two kinds of state dict are understood:

* `maskrcnn_resnet50_fpn`, `keypointrcnn_resnet50_fpn` (and any torchvision Mask / Keypoint R-CNN on a
  ResNet-FPN): keys under `backbone.`, `rpn.` and
  `roi_heads.`, in either layout torchvision has used: the released COCO_V1 file (`rpn.head.conv.weight`,
  `roi_heads.mask_head.mask_fcn1.weight`, `backbone.fpn.inner_blocks.0.weight`) or the one current torchvision
  writes (`rpn.head.conv.0.0.weight`, `roi_heads.mask_head.0.0.weight`, `backbone.fpn.inner_blocks.0.0.weight`).
  Every variable of the model is produced.
* torchvision ImageNet classifiers `resnet50` / `resnet101` and the ResNeXts `resnext50_32x4d` /
  `resnext101_32x8d` (`conv1.weight`, `layer1.0.conv1.weight`, ..., `fc.*`; a ResNeXt's grouped conv2 weight
  [out, in / groups, 3, 3] is a grouped flax kernel once transposed): only the backbone body, placed at
  `backbone/body/...` of the whole model (for a C4 model, `backbone_kind="c4"`, its `layer4` at `res5/...`), to be
  merged into freshly initialised variables with `maskrcnn_jax.convert.merge_pretrained` (the FPN and heads keep
  their initialisation; the ImageNet classifier `fc.*` is dropped).

Names follow the table in modeling/resnet.py and modeling/fpn.py; conv kernels become [kh, kw, in, out], linear
weights [in, out], the first box-head FC has its inputs re-ordered from torch's (C, 7, 7) flatten to our NHWC
(7, 7, C) one, and the mask head's transposed conv is reordered (see layout.py).

torchvision labels index the 91 COCO category slots directly (label k is COCO category id k), so the box and mask
predictors keep their 91 slots: ours has the same label-k-is-slot-k layout.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

from maskrcnn_jax.convert.layout import (
    VariableTree,
    check_backbone_kind,
    conv_kernel,
    conv_transpose_kernel,
    dense_kernel,
    dense_kernel_from_nchw_flatten,
    layer4_as_res5,
    to_numpy,
)

logger = logging.getLogger(__name__)

# Keys that carry no weights we need: BatchNorm's step counter and the ImageNet classifier.
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$|^fc\.(weight|bias)$")
_BODY_NORM = re.compile(r"^(bn\d|downsample\.1)$")


def _body_path(parts: list[str]) -> tuple[tuple[str, ...], str, bool]:
    """ResNet body key parts (after `backbone.body.` or at the top of an ImageNet file) -> (module path under
    `body`, leaf, is_norm). E.g. ["layer2", "0", "downsample", "1", "running_var"] ->
    (("layer2", "block_0", "downsample_bn"), "running_var", True)."""
    leaf = parts[-1]
    if parts[0].startswith("layer"):
        if len(parts) < 4:
            raise KeyError
        module = ".".join(parts[2:-1])
        name = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(module, module)
        if not re.fullmatch(r"conv\d|bn\d|downsample_conv|downsample_bn", name):
            raise KeyError
        return (parts[0], f"block_{int(parts[1])}", name), leaf, bool(_BODY_NORM.match(module))
    if len(parts) != 2 or parts[0] not in ("conv1", "bn1"):
        raise KeyError
    return (parts[0],), leaf, parts[0] == "bn1"


def _put_body(tree: VariableTree, key: str, parts: list[str], value, norm: str) -> None:
    path, leaf, is_norm = _body_path(parts)
    path = ("backbone", "body", *path)
    if is_norm:
        tree.put_norm(path, leaf, value, key, norm)
    elif leaf == "weight":
        tree.put("params", (*path, "kernel"), conv_kernel(value), key)
    else:
        raise KeyError


def _put_conv(tree: VariableTree, key: str, path: tuple[str, ...], leaf: str, value) -> None:
    if leaf == "weight":
        tree.put("params", (*path, "kernel"), conv_kernel(value), key)
    elif leaf == "bias":
        tree.put("params", (*path, "bias"), value, key)
    else:
        raise KeyError


def _put_dense(tree: VariableTree, key: str, path: tuple[str, ...], leaf: str, value, channels: int | None = None):
    if leaf == "weight":
        kernel = dense_kernel(value) if channels is None else dense_kernel_from_nchw_flatten(value, channels)
        tree.put("params", (*path, "kernel"), kernel, key)
    elif leaf == "bias":
        tree.put("params", (*path, "bias"), value, key)
    else:
        raise KeyError


def _put_detection_key(tree: VariableTree, key: str, value, norm: str, fpn_channels: int) -> None:
    parts = key.split(".")
    leaf = parts[-1]
    if key.startswith("backbone.body."):
        _put_body(tree, key, parts[2:], value, norm)
        return
    match = re.fullmatch(r"backbone\.fpn\.(inner|layer)_blocks\.(\d+)(?:\.0)?\.(weight|bias)", key)
    if match:
        kind = {"inner": "lateral", "layer": "output"}[match.group(1)]
        _put_conv(tree, key, ("backbone", "fpn", f"{kind}{int(match.group(2)) + 2}"), leaf, value)
        return
    match = re.fullmatch(r"rpn\.head\.(conv(?:\.0\.0)?|cls_logits|bbox_pred)\.(weight|bias)", key)
    if match:
        _put_conv(tree, key, ("rpn_head", match.group(1).split(".")[0]), leaf, value)
        return
    match = re.fullmatch(r"roi_heads\.(box_head|box_predictor)\.(fc6|fc7|cls_score|bbox_pred)\.(weight|bias)", key)
    if match:
        channels = fpn_channels if match.group(2) == "fc6" else None
        _put_dense(tree, key, ("box_head", match.group(2)), leaf, value, channels)
        return
    match = re.fullmatch(r"roi_heads\.mask_head\.(?:mask_fcn(\d+)|(\d+)\.0)\.(weight|bias)", key)
    if match:
        index = int(match.group(1)) if match.group(1) else int(match.group(2)) + 1
        _put_conv(tree, key, ("mask_head", f"mask_fcn{index}"), leaf, value)
        return
    if key == "roi_heads.mask_predictor.conv5_mask.weight":
        tree.put("params", ("mask_head", "conv5_mask", "kernel"), conv_transpose_kernel(value), key)
        return
    match = re.fullmatch(r"roi_heads\.mask_predictor\.(conv5_mask|mask_fcn_logits)\.(weight|bias)", key)
    if match:
        _put_conv(tree, key, ("mask_head", match.group(1)), leaf, value)
        return
    # KeypointRCNNHeads is a Sequential of (conv, ReLU) pairs: conv i sits at index 2 * i.
    match = re.fullmatch(r"roi_heads\.keypoint_head\.(\d+)(?:\.0)?\.(weight|bias)", key)
    if match and int(match.group(1)) % 2 == 0:
        _put_conv(tree, key, ("keypoint_head", f"conv_fcn{int(match.group(1)) // 2 + 1}"), leaf, value)
        return
    if key == "roi_heads.keypoint_predictor.kps_score_lowres.weight":
        tree.put("params", ("keypoint_head", "score_lowres", "kernel"), conv_transpose_kernel(value), key)
        return
    if key == "roi_heads.keypoint_predictor.kps_score_lowres.bias":
        tree.put("params", ("keypoint_head", "score_lowres", "bias"), value, key)
        return
    raise KeyError


def is_detection_state_dict(state_dict: Mapping[str, Any]) -> bool:
    return any(key.startswith("backbone.body.") for key in state_dict)


def is_keypoint_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """A Keypoint R-CNN (keypointrcnn_resnet50_fpn) rather than a Mask R-CNN."""
    return any(key.startswith("roi_heads.keypoint_predictor.") for key in state_dict)


def from_torchvision(state_dict: Mapping[str, Any], *, norm: str = "frozen_bn", backbone_kind: str = "fpn") -> dict:
    """A torchvision state dict (names -> tensors or arrays) -> {"params": ..., "batch_stats": ...} of NumPy arrays.

    `norm` is the backbone norm of the model that will receive the weights (`model.backbone.norm`): with
    "frozen_bn" (torchvision's detection default) every BatchNorm variable goes to batch_stats; with "bn" the affine
    weight and bias go to params. A Mask R-CNN state dict yields every variable of `build_model(config)` for a
    matching config (see configs/torchvision_maskrcnn_r50_fpn.py); an ImageNet ResNet or ResNeXt yields the backbone
    body only (see the module docstring), with its fifth stage at res5 when `backbone_kind` (the receiving
    `model.backbone.kind`) is "c4". Unknown keys raise ValueError, so nothing is silently dropped.
    """
    check_backbone_kind(backbone_kind)
    tree = VariableTree()
    detection = is_detection_state_dict(state_dict)
    fpn_channels = None
    if detection:
        lateral = next((k for k in state_dict if re.fullmatch(r"backbone\.fpn\.inner_blocks\.0(\.0)?\.weight", k)), None)
        if lateral is None:
            raise ValueError("a torchvision detection state dict needs backbone.fpn.inner_blocks.0 (an FPN backbone)")
        fpn_channels = int(to_numpy(state_dict[lateral]).shape[0])
    unknown, ignored = [], []
    for key, tensor in state_dict.items():
        if _IGNORED.search(key):
            ignored.append(key)
            continue
        value = to_numpy(tensor)
        try:
            if detection:
                _put_detection_key(tree, key, value, norm, fpn_channels)
            else:
                _put_body(tree, key, key.split("."), value, norm)
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} torchvision keys have no counterpart here: {unknown[:10]}")
    if not tree.sources:
        raise ValueError("the state dict holds no torchvision ResNet or Mask R-CNN weights")
    logger.info("torchvision import: %d variables from %d keys; ignored %d (%s)", len(tree.sources),
                len(state_dict), len(ignored), ", ".join(sorted({k.rsplit('.', 1)[-1] for k in ignored})) or "none")
    return layer4_as_res5(tree.variables) if backbone_kind == "c4" else tree.variables


def load_torch_file(path: str) -> dict:
    """Reads a `.pth` state dict (needs torch, from the `parity` extra). Accepts a bare state dict or one wrapped
    under "model" / "state_dict", as training scripts often save them."""
    try:
        import torch
    except ImportError as error:  # pragma: no cover - exercised only without the parity extra
        raise ImportError("reading .pth files needs torch: pip install 'maskrcnn_jax[parity]'") from error
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(checkpoint, Mapping) and wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
            checkpoint = checkpoint[wrapper]
    return {key: to_numpy(value) for key, value in checkpoint.items()}
