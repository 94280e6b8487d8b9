"""Importing pretrained weights: torchvision and detectron2 checkpoints -> our Flax variables.

    from_torchvision(state_dict)      torchvision Mask R-CNN R50-FPN, or an ImageNet ResNet-50/101 backbone
    from_detectron2(weights)          detectron2 model-zoo Mask R-CNN R50-FPN (.pkl), or the MSRA R-50/R-101.pkl
    merge_pretrained(fresh, imported) place imported variables into model.init's, re-initialising class-dependent
                                      layers when the number of classes differs
    keep_class_slots(variables, slots) select class slots, e.g. torchvision's 91 COCO ids -> 81 contiguous labels

`python -m maskrcnn_jax.convert --from=torchvision FILE.pth --out=WORKDIR` writes an Orbax checkpoint (see
checkpoint.py).
"""

from maskrcnn_jax.convert.detectron2 import from_detectron2, load_detectron2_pickle
from maskrcnn_jax.convert.finetune import (
    CLASS_DEPENDENT_LAYERS,
    COCO_CATEGORY_IDS,
    MergeReport,
    keep_class_slots,
    merge_pretrained,
    missing_variables,
)
from maskrcnn_jax.convert.torchvision import from_torchvision, load_torch_file

__all__ = [
    "CLASS_DEPENDENT_LAYERS",
    "COCO_CATEGORY_IDS",
    "MergeReport",
    "from_detectron2",
    "from_torchvision",
    "load_detectron2_pickle",
    "keep_class_slots",
    "load_torch_file",
    "merge_pretrained",
    "missing_variables",
]
