"""The keypoint model of the paper's ablations (experiments/ablations.py: Table 6, RoIAlign vs RoIPool for AP^kp).

configs/stick_figures.py (ResNet-18-GN-FPN from scratch, the mask head and a keypoint head of 13 one-hot 56 x 56
masks on the generated stick figures) on the 320 x 320 canvas of the other ablation configs: the figures stay
60-180 px tall, and a joint's position is the thing a quantized RoI (RoIPool) misplaces. A step takes 1.6 s on 2
cores with RoIAlign, 2.0 s with RoIPool (`experiments/ablations.py --smoke --studies=t6`, 2026-11-30).
"""

import pathlib

from maskrcnn_jax import config as config_lib


def get_config():
    config = config_lib.load(pathlib.Path(__file__).with_name("stick_figures.py"))
    config.data.canvas_size = (320, 320)  # configs/ablations_fpn.py's canvas
    return config
