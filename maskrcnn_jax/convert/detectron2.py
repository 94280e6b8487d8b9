"""detectron2 checkpoints (.pkl pickles of NumPy arrays) -> our Flax variables.

Three layouts are understood (names as detectron2 itself writes and reads them):

* A model-zoo Mask R-CNN R50/R101-FPN (e.g. COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x, model_final_f10217.pkl:
  {"model": {name: array}, "__author__": ...}). Names are those of detectron2's modules:
    backbone.bottom_up.stem.conv1.weight (+ .norm.{weight,bias,running_mean,running_var})
    backbone.bottom_up.res{2-5}.{b}.conv{1,2,3}.weight (+ .norm.*), ...shortcut.weight (+ .norm.*)
    backbone.fpn_lateral{2-5}.{weight,bias}, backbone.fpn_output{2-5}.{weight,bias}
    proposal_generator.rpn_head.{conv,objectness_logits,anchor_deltas}.{weight,bias}
    roi_heads.box_head.fc{1,2}.{weight,bias}
    roi_heads.box_predictor.cls_score.{weight,bias} [K+1, 1024], background LAST
    roi_heads.box_predictor.bbox_pred.{weight,bias} [4K, 1024] (or [4, 1024] class-agnostic), no background
    roi_heads.mask_head.mask_fcn{1-4}.{weight,bias}, .deconv.{weight,bias} (ConvTranspose2d),
    roi_heads.mask_head.predictor.{weight,bias} [K, 256, 1, 1] (or [1, ...] class-agnostic), no background
  `pixel_mean` / `pixel_std` and anchor buffers, which older files carry, describe preprocessing and anchors that
  the config sets; they are checked to be present at most once and otherwise skipped.
* A model-zoo Mask R-CNN R50/R101-C4 (COCO-InstanceSegmentation/mask_rcnn_R_50_C4_{1x,3x}; detectron2's
  Res5ROIHeads), for a model with backbone.kind "c4" (configs/detectron2_maskrcnn_r50_c4.py). The backbone is a
  bare ResNet up to res4, so its names lack `bottom_up`; res5 runs on RoIs under `roi_heads`:
    backbone.stem.conv1.*, backbone.res{2-4}.{b}.* -> backbone/body/... as above
    proposal_generator.rpn_head.* as above, with 15 anchors (5 sizes x 3 ratios) per position
    roi_heads.res5.{b}.conv{1,2,3}.*, ...shortcut.* -> res5/block_{b}/... (resnet.py's names)
    roi_heads.box_predictor.{cls_score,bbox_pred} [.., 2048] as above (on res5's average-pooled output)
    roi_heads.mask_head.deconv [2048, 256, 2, 2] and .predictor as above (no mask_fcn convs)
* The MSRA ImageNet backbones (ImageNetPretrained/MSRA/R-50.pkl, R-101.pkl), Caffe2 blob names, possibly under
  "blobs": conv1_w, res_conv1_bn_{s,b}, res{2-5}_{b}_branch1_w, res{2-5}_{b}_branch1_bn_{s,b},
  res{2-5}_{b}_branch2{a,b,c}_w, res{2-5}_{b}_branch2{a,b,c}_bn_{s,b}, fc1000_{w,b} (dropped), *_momentum (dropped).
  The Caffe2 affine "bn" has a scale and a shift only; as detectron2 does, its FrozenBN gets running_mean 0 and
  running_var 1. This yields the backbone body only (for a C4 model, `backbone_kind="c4"`, with res5 at res5/...);
  merge it with `merge_pretrained`.

Conventions (set by configs/detectron2_maskrcnn_r50_fpn.py): the stride sits in the first 1x1 conv
(stride_in_1x1=True), RoIAlign is aligned, and the networks were trained on BGR images minus the Caffe mean with
std 1. Our input pipeline feeds RGB, so by default (`input_order="rgb"`) the importer reverses the input channels
of the first conv: the model then reads RGB images normalised with the same per-channel mean (in RGB order) and
std 1, and computes exactly what detectron2 computes on the BGR image. Pass input_order="bgr" to keep the kernel as
it is (for a pipeline that feeds BGR).

Labels: detectron2's contiguous class i (0..K-1) is our label i + 1 (slot 0 is the background), so K classes give
num_classes = K + 1. The classifier's background row moves from last to first; box-delta and mask predictors gain a
zero background slot, which nothing reads (detection skips it and masks are taken for the predicted class). A
class-agnostic box regressor is repeated into every class slot, which computes the same boxes.
"""

from __future__ import annotations

import logging
import pickle
import re
from typing import Any, Mapping

import numpy as np

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

# Skipped: preprocessing constants and anchor buffers that older checkpoints saved (the config carries them), and
# BatchNorm step counters.
_SKIPPED = re.compile(r"^(pixel_mean|pixel_std)$|anchor_generator\.cell_anchors|(^|\.)num_batches_tracked$")
_CAFFE2_SKIPPED = re.compile(r"_momentum$|^fc1000_[wb]$")
STEM_CONV = ("backbone", "body", "conv1")  # the one conv that reads the image
_NORM_LEAVES = {"weight": "weight", "bias": "bias", "running_mean": "running_mean", "running_var": "running_var"}


class RefusedPickleError(pickle.UnpicklingError, ValueError):
    """A .pkl names a global outside `_PICKLE_GLOBALS`: unpickling it could run arbitrary code, so it is not read."""


def _latin1_encode(text, encoding="latin1"):
    """`_codecs.encode` as Python 3 pickles bytes at protocol < 3 (bytes -> latin-1 text -> this); nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is allowed only as pickle writes bytes, got {encoding!r}")
    return text.encode("latin1")


# Everything a pickle of NumPy arrays, numbers and plain containers names (dicts, lists, tuples, str, bytes and
# numbers have opcodes of their own): NumPy 1 writes numpy.core.*, NumPy 2 numpy._core.*; protocol 5 rebuilds
# contiguous arrays with _frombuffer; Python 2 files (protocol 2) say __builtin__ where Python 3 says builtins.
_BUILTINS = ("set", "frozenset", "bytearray", "bytes", "complex", "int", "float", "bool", "str", "list", "dict",
             "tuple", "range", "slice", "xrange", "long", "unicode")
_PICKLE_GLOBALS = frozenset(
    [(f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")]
    + [(module, name) for module in ("builtins", "__builtin__") for name in _BUILTINS])


class _ArraysUnpickler(pickle.Unpickler):
    """An Unpickler that rebuilds only NumPy arrays, dtypes, numbers and plain containers: any other global (os.system,
    builtins.eval, a class whose constructor does something) is refused before it is imported or called."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")  # the MSRA files were pickled by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) not in _PICKLE_GLOBALS:
            raise RefusedPickleError(
                f"refusing {self.path}: it asks for {module}.{name}, and loading it would run that code (a "
                "detectron2 .pkl needs only NumPy arrays, numbers and plain containers)")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise RefusedPickleError(f"refusing {self.path}: it holds a persistent id ({pid!r}), not plain arrays")


def load_array_pickle(path: str) -> Any:
    """Unpickles `path` allowing only NumPy arrays, dtypes, numbers and plain containers (`_PICKLE_GLOBALS`); a
    file that names anything else raises RefusedPickleError without running it."""
    with open(path, "rb") as f:
        return _ArraysUnpickler(f, path).load()


def load_detectron2_pickle(path: str) -> dict[str, np.ndarray]:
    """Reads a detectron2 model-zoo .pkl or a Caffe2/MSRA .pkl into {name: float32 array} (names unchanged).
    Only arrays, numbers and plain containers are unpickled (`load_array_pickle`): anything else is refused."""
    data = load_array_pickle(path)
    if isinstance(data, Mapping) and "model" in data and isinstance(data["model"], Mapping):
        data = data["model"]
    elif isinstance(data, Mapping) and "blobs" in data and isinstance(data["blobs"], Mapping):
        data = data["blobs"]
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} does not hold a dict of arrays")
    return {str(key): to_numpy(value) for key, value in data.items()}


def is_caffe2_names(weights: Mapping[str, Any]) -> bool:
    return "conv1_w" in weights or "res_conv1_bn_s" in weights


def _caffe2_to_detectron2_names(weights: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
    """MSRA Caffe2 blob names -> detectron2's backbone names (as detectron2's convert_basic_c2_names maps them),
    with the missing FrozenBN statistics filled in (mean 0, var 1)."""
    renamed, skipped = {}, []
    for key, value in weights.items():
        if _CAFFE2_SKIPPED.search(key):
            skipped.append(key)
            continue
        match = re.fullmatch(r"(?:res_)?conv1_(w|bn_s|bn_b|bn_rm|bn_riv)", key)
        if match:
            prefix, leaf = "stem.conv1", match.group(1)
        else:
            match = re.fullmatch(r"res(\d)_(\d+)_branch(1|2a|2b|2c)_(w|bn_s|bn_b|bn_rm|bn_riv)", key)
            if not match:
                raise ValueError(f"unknown Caffe2 blob {key!r}")
            module = {"1": "shortcut", "2a": "conv1", "2b": "conv2", "2c": "conv3"}[match.group(3)]
            prefix, leaf = f"res{match.group(1)}.{int(match.group(2))}.{module}", match.group(4)
        name = {"w": "weight", "bn_s": "norm.weight", "bn_b": "norm.bias", "bn_rm": "norm.running_mean",
                "bn_riv": "norm.running_var"}[leaf]
        renamed[f"backbone.bottom_up.{prefix}.{name}"] = value
    for key in list(renamed):
        if key.endswith(".norm.weight"):
            stem = key[: -len("weight")]
            renamed.setdefault(stem + "running_mean", np.zeros_like(renamed[key]))
            renamed.setdefault(stem + "running_var", np.ones_like(renamed[key]))
    return renamed, skipped


def _bottom_up_path(parts: list[str]) -> tuple[tuple[str, ...], str | None]:
    """["stem", "conv1", "norm"] -> (("conv1",), None) with norm "bn1"; ["res3", "0", "shortcut"] -> ..."""
    if parts[:2] == ["stem", "conv1"]:
        conv, norm = ("conv1",), ("bn1",)
    else:
        match = re.fullmatch(r"res(\d)", parts[0])
        if not match or len(parts) < 3:
            raise KeyError
        stage = (f"layer{int(match.group(1)) - 1}", f"block_{int(parts[1])}")
        module = parts[2]
        if module == "shortcut":
            conv, norm = (*stage, "downsample_conv"), (*stage, "downsample_bn")
        elif re.fullmatch(r"conv\d", module):
            conv, norm = (*stage, module), (*stage, f"bn{module[4:]}")
        else:
            raise KeyError
        parts = ["", "", *parts[3:]]
    rest = parts[2:]
    if rest == []:
        return conv, None
    if rest == ["norm"]:
        return norm, "norm"
    raise KeyError


def _class_rows(value: np.ndarray, num_classes: int | None, per_class: int, what: str) -> np.ndarray:
    """Predictor rows [K * per_class, ...] without background -> [(K + 1) * per_class, ...] with a zero background
    slot first; a class-agnostic [per_class, ...] predictor is repeated into all K + 1 slots."""
    if value.shape[0] == per_class and num_classes not in (None, 1):
        return np.concatenate([value] * (num_classes + 1), axis=0)
    if value.shape[0] % per_class:
        raise ValueError(f"{what}: {value.shape[0]} rows are not a multiple of {per_class}")
    return np.concatenate([np.zeros((per_class, *value.shape[1:]), value.dtype), value], axis=0)


def from_detectron2(weights: Mapping[str, Any], *, norm: str = "frozen_bn", input_order: str = "rgb",
                    backbone_kind: str = "fpn") -> dict:
    """detectron2 weights ({name: array}, e.g. from `load_detectron2_pickle`) -> {"params", "batch_stats"}.

    `norm` is the backbone norm of the receiving model (see `from_torchvision`); `input_order` is the channel order
    the receiving pipeline feeds ("rgb": reverse conv1's input channels, see the module docstring). A full Mask
    R-CNN yields every variable of the model built from configs/detectron2_maskrcnn_r50_fpn.py, or for a C4 file
    configs/detectron2_maskrcnn_r50_c4.py (num_classes = K + 1); an MSRA backbone yields backbone/body only, its
    res5 at res5/... when `backbone_kind` (the receiving `model.backbone.kind`) is "c4". Unknown names raise
    ValueError.
    """
    if input_order not in ("rgb", "bgr"):
        raise ValueError(f"input_order must be 'rgb' or 'bgr', got {input_order!r}")
    check_backbone_kind(backbone_kind)
    weights = {key: to_numpy(value) for key, value in weights.items()}
    skipped = []
    if is_caffe2_names(weights):
        weights, skipped = _caffe2_to_detectron2_names(weights)
    num_classes = None
    if "roi_heads.box_predictor.cls_score.weight" in weights:
        num_classes = weights["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
    fpn_channels = weights["backbone.fpn_lateral2.weight"].shape[0] if "backbone.fpn_lateral2.weight" in weights else None

    tree = VariableTree()
    unknown = []
    for key, value in weights.items():
        if _SKIPPED.search(key):
            skipped.append(key)
            continue
        try:
            _put(tree, key, value, norm, input_order, num_classes, fpn_channels)
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} detectron2 names have no counterpart here: {unknown[:10]}")
    if not tree.sources:
        raise ValueError("no detectron2 ResNet or Mask R-CNN weights found")
    logger.info("detectron2 import: %d variables; skipped %s", len(tree.sources), skipped or "nothing")
    return layer4_as_res5(tree.variables) if backbone_kind == "c4" else tree.variables


def _resnet_module_path(key: str, parts: list[str]) -> tuple[tuple[str, ...], str | None] | None:
    """Our module path of a ResNet conv or norm key and whether it is the norm, or None for other keys: the FPN
    backbone's `backbone.bottom_up.*`, the C4 backbone's `backbone.{stem,res2-4}.*` and the C4 head's
    `roi_heads.res5.*`."""
    if key.startswith("backbone.bottom_up."):
        path, is_norm = _bottom_up_path(parts[2:-1])
        return ("backbone", "body", *path), is_norm
    if re.match(r"backbone\.(stem|res\d)\.", key):
        path, is_norm = _bottom_up_path(parts[1:-1])
        return ("backbone", "body", *path), is_norm
    if key.startswith("roi_heads.res5."):
        path, is_norm = _bottom_up_path(parts[1:-1])  # (layer4, block_b, ...): the fifth stage's own names
        return ("res5", *path[1:]), is_norm
    return None


def _put(tree, key, value, norm, input_order, num_classes, fpn_channels):
    parts = key.split(".")
    leaf = parts[-1]
    resnet_module = _resnet_module_path(key, parts)
    if resnet_module is not None:
        path, is_norm = resnet_module
        if is_norm:
            tree.put_norm(path, _NORM_LEAVES[leaf], value, key, norm)
        elif leaf == "weight":
            kernel = conv_kernel(value)
            if path == STEM_CONV and input_order == "rgb":
                kernel = np.ascontiguousarray(kernel[:, :, ::-1, :])  # BGR-trained filters read RGB input
            tree.put("params", (*path, "kernel"), kernel, key)
        else:
            raise KeyError
        return
    match = re.fullmatch(r"backbone\.fpn_(lateral|output)(\d)\.(weight|bias)", key)
    if match:
        _conv(tree, key, ("backbone", "fpn", f"{match.group(1)}{match.group(2)}"), leaf, value)
        return
    match = re.fullmatch(r"proposal_generator\.rpn_head\.(conv|objectness_logits|anchor_deltas)\.(weight|bias)", key)
    if match:
        name = {"conv": "conv", "objectness_logits": "cls_logits", "anchor_deltas": "bbox_pred"}[match.group(1)]
        _conv(tree, key, ("rpn_head", name), leaf, value)
        return
    match = re.fullmatch(r"roi_heads\.box_head\.fc(\d)\.(weight|bias)", key)
    if match:
        name = {"1": "fc6", "2": "fc7"}[match.group(1)]
        if leaf == "weight":
            kernel = dense_kernel_from_nchw_flatten(value, fpn_channels) if name == "fc6" else dense_kernel(value)
            tree.put("params", ("box_head", name, "kernel"), kernel, key)
        else:
            tree.put("params", ("box_head", name, "bias"), value, key)
        return
    if key.startswith("roi_heads.box_predictor.cls_score."):
        # [K+1] rows with background last -> background first.
        value = np.concatenate([value[-1:], value[:-1]], axis=0)
        _dense(tree, key, ("box_head", "cls_score"), leaf, value)
        return
    if key.startswith("roi_heads.box_predictor.bbox_pred."):
        _dense(tree, key, ("box_head", "bbox_pred"), leaf, _class_rows(value, num_classes, 4, key))
        return
    match = re.fullmatch(r"roi_heads\.mask_head\.(mask_fcn\d|deconv|predictor)\.(weight|bias)", key)
    if match:
        module = match.group(1)
        if module == "deconv":
            if leaf == "weight":
                tree.put("params", ("mask_head", "conv5_mask", "kernel"), conv_transpose_kernel(value), key)
            else:
                tree.put("params", ("mask_head", "conv5_mask", "bias"), value, key)
            return
        if module == "predictor":
            if value.shape[0] != 1:  # class-specific: add the background slot
                value = _class_rows(value, num_classes, 1, key)
            module = "mask_fcn_logits"
        _conv(tree, key, ("mask_head", module), leaf, value)
        return
    raise KeyError


def _conv(tree, key, path, leaf, value):
    if leaf == "weight":
        tree.put("params", (*path, "kernel"), conv_kernel(value), key)
    elif leaf == "bias":
        tree.put("params", (*path, "bias"), value, key)
    else:
        raise KeyError


def _dense(tree, key, path, leaf, value):
    if leaf == "weight":
        tree.put("params", (*path, "kernel"), dense_kernel(value), key)
    elif leaf == "bias":
        tree.put("params", (*path, "bias"), value, key)
    else:
        raise KeyError
