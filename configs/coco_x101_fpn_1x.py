"""ResNeXt-101-32x8d-FPN Mask R-CNN on COCO with detectron2's 1x recipe: coco_r50_fpn_1x.py with the backbone of
detectron2's mask_rcnn_X_101_32x8d_FPN_3x (32 groups of 8 channels in res2's bottleneck, doubling each stage; the
stride in the 3x3 conv). detectron2's model zoo trains it 3x only; the 1x schedule here matches the other Table 2a
rows.

Start from torchvision's resnext101_32x8d ImageNet weights (python -m maskrcnn_jax.convert --from=torchvision
resnext101_32x8d-*.pth --config=configs/coco_x101_fpn_1x.py ...), which expect torchvision's input normalisation:
the ImageNet mean and std on RGB, set here. (detectron2's FAIR X-101-32x8d.pkl reads BGR with the same std,
reversed.)
"""

import pathlib

from maskrcnn_jax.config import load


def get_config():
    config = load(pathlib.Path(__file__).with_name("coco_r50_fpn_1x.py"))
    b = config.model.backbone
    b.depth = 101
    b.groups = 32
    b.width_per_group = 8
    b.stride_in_1x1 = False
    config.data.pixel_mean = (123.675, 116.28, 103.53)  # RGB, 0-255 scale
    config.data.pixel_std = (58.395, 57.12, 57.375)
    return config
