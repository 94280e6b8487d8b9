"""The C4 model of the paper's ablations (experiments/ablations.py: Table 2a's C4 rows and the RoI layers of 2c).

configs/shapes_c4.py (ResNet-18-GN-C4 from scratch: RPN and 14 x 14 RoI pooling on C4 at stride 16, res5 as the
RoI head) on a 320 x 320 canvas: the 256-320 px images are barely resized, so the shapes stay 20-120 px across and
C4 is a 20 x 20 grid of 16-pixel cells against them. A small shape spans one or two cells, a large one about seven:
quantizing an RoI's edges and bins to that grid (RoIPool) moves them by up to 8 px, which is what RoIAlign removes.
A step takes 3.0 s on 2 cores for every RoI layer of 2c (`experiments/ablations.py --smoke --studies=2c`, 2026-11-30).
"""

import pathlib

from maskrcnn_jax import config as config_lib


def get_config():
    config = config_lib.load(pathlib.Path(__file__).with_name("shapes_c4.py"))
    config.data.canvas_size = (320, 320)  # configs/ablations_fpn.py's canvas
    return config
