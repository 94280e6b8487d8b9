"""Merging imported weights into freshly initialised variables, for training or fine-tuning.

`merge_pretrained(fresh, imported)` takes every imported variable whose path and shape match the model, keeps the
fresh initialisation for variables the import does not cover (the FPN and heads after an ImageNet backbone import),
and re-initialises the class-dependent layers when the number of classes differs (a COCO model fine-tuned on a
dataset with other classes). Anything else that does not fit is an error: a shape mismatch in a class-independent
layer means the config does not describe the checkpoint (wrong depth, norm or FPN width).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import jax
import numpy as np

from maskrcnn_jax.convert.layout import flatten, unflatten

logger = logging.getLogger(__name__)

# The layers whose shapes depend on num_classes (with the collection-free module path).
CLASS_DEPENDENT_LAYERS = (
    ("box_head", "cls_score"),
    ("box_head", "bbox_pred"),
    ("mask_head", "mask_fcn_logits"),  # FCN mask head
    ("mask_head", "mask_logits"),  # MLP mask head
)


def is_class_dependent(path: tuple[str, ...]) -> bool:
    """path: (collection, module, ..., leaf)."""
    return tuple(path[1:3]) in CLASS_DEPENDENT_LAYERS


@dataclasses.dataclass
class MergeReport:
    """What `merge_pretrained` did, as "collection/module/.../leaf" names."""

    loaded: list[str]
    reinitialized: list[str]  # class-dependent variables whose imported shape did not fit
    kept_initial: list[str]  # variables the import does not cover

    def summary(self) -> str:
        layers = sorted({"/".join(name.split("/")[1:-1]) for name in self.reinitialized})
        return (f"loaded {len(self.loaded)} variables, re-initialised {len(self.reinitialized)} class-dependent "
                f"variables ({', '.join(layers) or 'none'}), kept the initialisation of {len(self.kept_initial)}")


def merge_pretrained(fresh: Mapping[str, Any], imported: Mapping[str, Any]) -> tuple[dict, MergeReport]:
    """fresh: variables from `model.init` (the target shapes); imported: the output of an importer.

    Returns (variables, report): the fresh tree with every fitting imported leaf in its place (as float32 arrays of
    the same kind the fresh tree holds) and what happened to each variable. Logs the re-initialised layers.
    Raises ValueError for imported variables the model does not have, and for shape mismatches outside the
    class-dependent layers.
    """
    fresh_flat = flatten(fresh)
    imported_flat = flatten(imported)
    extra = sorted("/".join(path) for path in imported_flat if path not in fresh_flat)
    if extra:
        raise ValueError(f"{len(extra)} imported variables do not exist in this model (check the config's depth, "
                         f"norm and heads): {extra[:10]}")
    merged, loaded, reinitialized, kept = {}, [], [], []
    for path, initial in fresh_flat.items():
        name = "/".join(path)
        if path not in imported_flat:
            merged[path] = initial
            kept.append(name)
            continue
        value = np.asarray(imported_flat[path])
        if tuple(value.shape) == tuple(initial.shape):
            merged[path] = jax.numpy.asarray(value, dtype=initial.dtype)
            loaded.append(name)
        elif is_class_dependent(path):
            merged[path] = initial
            reinitialized.append(name)
            logger.warning("re-initialised %s: checkpoint shape %s, model shape %s (different number of classes)",
                           name, tuple(value.shape), tuple(initial.shape))
        else:
            raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} does not fit the model's "
                             f"{tuple(initial.shape)}, and it is not a class-dependent layer")
    report = MergeReport(loaded, reinitialized, kept)
    logger.info("merge_pretrained: %s", report.summary())
    return unflatten(merged), report


# The 80 COCO category ids in use (of 1..90). torchvision's COCO models predict label k for category id k, while
# our pipeline numbers categories 1..80 in ascending id order (data/coco_format.py).
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91)
)


def keep_class_slots(variables: Mapping[str, Any], slots) -> dict:
    """Keeps the class slots `slots` (slot 0, the background, first) of every class-dependent layer, in that order.

    E.g. `keep_class_slots(from_torchvision(sd), (0, *COCO_CATEGORY_IDS))` turns torchvision's 91 COCO-id slots into
    the 81 contiguous labels our COCO pipeline uses (num_classes=81). The softmax then runs over 81 logits instead
    of 91; the 10 dropped ids never had a training example, so their logits are far below the rest and the scores
    barely move. A class-agnostic mask predictor (one channel) is left as it is.
    """
    slots = np.asarray(slots)
    if slots.ndim != 1 or slots[0] != 0 or len(set(slots.tolist())) != len(slots):
        raise ValueError("slots must be distinct, with the background slot 0 first")
    flat = dict(flatten(variables))
    for path, value in flat.items():
        if not is_class_dependent(path):
            continue
        value = np.asarray(value)
        if path[2] == "mask_logits":
            raise ValueError("keep_class_slots handles the FCN mask head only (no importer produces the MLP one)")
        if path[2] == "bbox_pred":  # 4 deltas per slot, slot-major
            value = value.reshape(*value.shape[:-1], -1, 4)[..., slots, :]
            flat[path] = value.reshape(*value.shape[:-2], -1)
        elif value.shape[-1] > 1:  # classifier and class-specific masks: one output per slot
            flat[path] = value[..., slots]
    return unflatten(flat)


def missing_variables(template: Mapping[str, Any], imported: Mapping[str, Any]) -> list[str]:
    """Variables of `template` (e.g. `jax.eval_shape(model.init, ...)`) that `imported` does not provide."""
    imported_flat = flatten(imported)
    return sorted("/".join(path) for path in flatten(template) if path not in imported_flat)
