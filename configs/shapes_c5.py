"""The C5 counterpart of configs/shapes.py for the ablation runner (experiments/ablations.py --config=...): the
paper's Table 2d setting, RPN and RoI pooling on res5's output at stride 32, on the same generated shapes, canvas,
schedule and ResNet-18-GN.

On the 192 x 192 canvas C5 is a 6 x 6 grid of 32-pixel cells: a shape (about 12-90 pixels after the resize) spans
one to three cells, so quantizing an RoI to that grid (RoIPool) moves its edges by up to half an object. That is
why the paper measured RoIAlign's largest gain here (+7.3 mask AP, +10.5 AP75 on ResNet-50-C5).

Heads: the paper's text on Table 2d says it uses "the same head as in Figure 4 (right), as the res5 head is not
applicable" (res5 already is the backbone's last stage), i.e. the FPN heads on the one C5 level: two FCs on 7 x 7
RoI features for boxes, the conv mask head on 14 x 14 RoI features giving 28 x 28 masks (detectron2 likewise runs
its C5 models with StandardROIHeads). The head sizes are shapes.py's. Measured on the 2-core CPU with 4 images
per step: about 1.7 s per step, against 0.9 s for shapes.py (the first FC reads 7 x 7 x 512 C5 features).
"""

import pathlib

from maskrcnn_jax.config import load


def get_config():
    config = load(pathlib.Path(__file__).with_name("shapes.py"))
    m = config.model
    m.backbone.kind = "c5"
    m.anchors.strides = (32,)
    m.anchors.sizes = (16, 32, 64, 128, 256)  # shapes.py's sizes, all on the one level
    m.roi_heads.pool_strides = (32,)
    return config
