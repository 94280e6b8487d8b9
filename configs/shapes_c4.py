"""The C4 counterpart of configs/shapes.py for the ablation runner (experiments/ablations.py --config=...): the same
generated shapes, canvas, schedule and ResNet-18-GN, with the paper's C4 model instead of FPN.

On the 192 x 192 canvas C4 is a 12 x 12 grid of 16-pixel cells, coarse against the shapes (about 12-90 pixels after
the resize), which is where RoIPool's quantization hurts (the paper's Table 2c is on R50-C4). The RPN reads C4 with
every anchor size on it (5 sizes x 3 ratios); RoIs are pooled 14 x 14 on C4, res5 (ResNet-18's fourth stage) runs
on them, a global average feeds the box predictor and a transposed conv gives 14 x 14 masks.

res5 on every sampled RoI makes the C4 train step the expensive one (forward and backward through ResNet-18's
fourth stage, 512 channels, per RoI): 32 RoIs per image here instead of shapes.py's 64, as the paper too samples
fewer RoIs for C4 than for FPN (64 against 512 per image). Measured on the 2-core CPU with 4 images per step:
about 5 s per step, against 0.9 s for shapes.py.
"""

import pathlib

from maskrcnn_jax.config import load


def get_config():
    config = load(pathlib.Path(__file__).with_name("shapes.py"))
    m = config.model
    m.backbone.kind = "c4"
    m.anchors.strides = (16,)
    m.anchors.sizes = (16, 32, 64, 128, 256)  # shapes.py's sizes, all on the one level
    r = m.roi_heads
    r.pool_strides = (16,)
    r.box_pool_size = 14  # res5 halves it to 7
    r.mask_num_convs = 0  # the transposed conv reads res5's output directly
    r.batch_size_per_image = 32  # res5 runs on each: see above
    return config
