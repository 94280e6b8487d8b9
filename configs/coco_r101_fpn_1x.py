"""R101-FPN Mask R-CNN on COCO with detectron2's 1x recipe: coco_r50_fpn_1x.py with ResNet-101 (detectron2's
model zoo trains it 3x only, mask_rcnn_R_101_FPN_3x; the 1x schedule here matches the other Table 2a rows)."""

import pathlib

from maskrcnn_jax.config import load


def get_config():
    config = load(pathlib.Path(__file__).with_name("coco_r50_fpn_1x.py"))
    config.model.backbone.depth = 101
    return config
