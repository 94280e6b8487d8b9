"""The C5 model of the paper's ablations (experiments/ablations.py: Table 2d, RoIAlign vs RoIPool at stride 32).

configs/shapes_c5.py (ResNet-18-GN from scratch, RPN and RoI pooling on res5's output at stride 32 with the FPN
heads) on a 320 x 320 canvas: the shapes stay 20-120 px across and C5 is a 10 x 10 grid of 32-pixel cells, so a
shape spans one to four cells and RoIPool's rounding moves an RoI's edges by up to 16 px, a large part of the
object. That is the paper's setting for its largest RoIAlign gain (+7.3 mask AP, +10.5 AP75 on ResNet-50-C5).
A step takes 1.3-1.5 s on 2 cores (`experiments/ablations.py --smoke --studies=2d`, 2026-11-30).
"""

import pathlib

from maskrcnn_jax import config as config_lib


def get_config():
    config = config_lib.load(pathlib.Path(__file__).with_name("shapes_c5.py"))
    config.data.canvas_size = (320, 320)  # configs/ablations_fpn.py's canvas
    return config
