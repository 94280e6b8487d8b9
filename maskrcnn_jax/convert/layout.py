"""PyTorch tensor layouts -> our Flax layouts, and the nested {"params", "batch_stats"} tree the importers fill.

Every importer turns a foreign checkpoint into a list of assignments (collection, path, array). `VariableTree`
collects them, refuses to write one variable twice, and remembers which foreign key each variable came from, so an
importer can say exactly what it used and what it left over.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

# Norm-layer leaves as our norm modules name them (layers/norm.py): statistics always live in batch_stats; the
# affine weight and bias live there too for FrozenBN and in params for trainable BN / GroupNorm.
NORM_STATISTICS = ("running_mean", "running_var")
NORM_AFFINE = ("weight", "bias")


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor, NumPy array or anything array-like -> a float32 (or integer) NumPy array, on the host."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] -> flax Conv kernel [kh, kw, in, out]."""
    if weight.ndim != 4:
        raise ValueError(f"expected a 4-d conv weight, got shape {weight.shape}")
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


def conv_transpose_kernel(weight: np.ndarray) -> np.ndarray:
    """torch ConvTranspose2d weight [in, out, kh, kw] -> our Deconv2x2 kernel [kh, kw, in, out].

    Both scatter input pixel i to output i * stride + a with weight tap a, so no spatial flip is needed
    (tests/test_convert.py checks this numerically against torch).
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a 4-d transposed-conv weight, got shape {weight.shape}")
    return np.ascontiguousarray(weight.transpose(2, 3, 0, 1))


def dense_kernel(weight: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> flax Dense kernel [in, out]."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-d linear weight, got shape {weight.shape}")
    return np.ascontiguousarray(weight.T)


def dense_kernel_from_nchw_flatten(weight: np.ndarray, channels: int) -> np.ndarray:
    """The first FC after RoI pooling: torch flattens pooled features as (C, H, W); we flatten NHWC as (H, W, C).

    weight [out, C * H * W] -> kernel [H * W * C, out] whose rows follow our flatten order (H = W assumed square).
    """
    out_features, in_features = weight.shape
    side = int(round((in_features / channels) ** 0.5))
    if channels * side * side != in_features:
        raise ValueError(f"{in_features} inputs are not {channels} channels of a square pooled map")
    per_pixel = weight.reshape(out_features, channels, side, side).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(per_pixel.reshape(out_features, in_features).T)


class VariableTree:
    """Nested {"params": {...}, "batch_stats": {...}} being filled from a foreign checkpoint."""

    def __init__(self):
        self.variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
        self.sources: dict[tuple[str, ...], str] = {}  # (collection, *path) -> foreign key

    def put(self, collection: str, path: tuple[str, ...], value: np.ndarray, source: str) -> None:
        full = (collection, *path)
        if full in self.sources:
            raise ValueError(f"{'/'.join(full)} is written by both {self.sources[full]!r} and {source!r}")
        node = self.variables[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
        self.sources[full] = source

    def put_norm(self, path: tuple[str, ...], leaf: str, value: np.ndarray, source: str, norm: str) -> None:
        """A norm-layer leaf (weight, bias, running_mean, running_var) into the collection our `norm` keeps it in."""
        if leaf in NORM_STATISTICS:
            if norm == "gn":
                raise ValueError(f"{source!r} holds BatchNorm statistics but the target norm is GroupNorm")
            collection = "batch_stats"
        elif leaf in NORM_AFFINE:
            collection = "batch_stats" if norm == "frozen_bn" else "params"
        else:
            raise ValueError(f"{source!r}: unknown norm leaf {leaf!r}")
        self.put(collection, (*path, leaf), value, source)


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dicts -> {path tuple: leaf}."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, (*prefix, name)))
        else:
            flat[(*prefix, name)] = value
    return flat


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """{path tuple: leaf} -> nested dicts."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


# The C4 model runs ResNet's fifth stage on RoIs: its variables are res5/... instead of backbone/body/layer4/...
# (modeling/res5_head.py), with the same names below.
BODY_LAYER4 = ("backbone", "body", "layer4")
RES5 = ("res5",)
BACKBONE_KINDS = ("fpn", "c4", "c5")  # model.backbone.kind (modeling/mask_rcnn.py)


def check_backbone_kind(backbone_kind: str) -> None:
    if backbone_kind not in BACKBONE_KINDS:
        raise ValueError(f"backbone_kind must be one of {BACKBONE_KINDS}, got {backbone_kind!r}")


def layer4_as_res5(variables: Mapping[str, Any]) -> dict:
    """An import for a C4 model (model.backbone.kind "c4"): the body's fifth stage backbone/body/layer4/... (from an
    ImageNet ResNet) moved to res5/..., in every collection; anything else as it is."""
    moved = {}
    for collection, tree in variables.items():
        flat = {}
        for path, value in flatten(tree).items():
            if path[: len(BODY_LAYER4)] == BODY_LAYER4:
                path = RES5 + path[len(BODY_LAYER4):]
            flat[path] = value
        moved[collection] = unflatten(flat)
    return moved

