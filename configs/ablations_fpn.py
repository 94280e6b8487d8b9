"""The FPN model of the paper's ablations (experiments/ablations.py: Table 2a's FPN rows, 2b, 2e), on generated shapes.

configs/shapes.py (ResNet-18 with GroupNorm from scratch, a 64-channel FPN, AdamW, the shapes' 5 classes) on the
320 x 320 canvas of the C4 and C5 ablation configs instead of 192 x 192, so that Table 2a compares FPN with C4 on
the same images: the 256-320 px images are then barely resized and the shapes stay 20-120 px across. RoIs of that
size are pooled from P2 (stride 4) by the FPN level rule, as on COCO. A step takes 1.2-1.3 s on 2 cores (2.0 s
with ResNet-34; `experiments/ablations.py --smoke`, 2026-11-30).
"""

import pathlib

from maskrcnn_jax import config as config_lib


def get_config():
    config = config_lib.load(pathlib.Path(__file__).with_name("shapes.py"))
    config.data.canvas_size = (320, 320)  # a multiple of every stride up to P6's 64
    return config
