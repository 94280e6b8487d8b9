"""Keypoints and masks from scratch on generated stick figures (data/stick_figures.py), sized for a 2-core CPU.

The shapes demo's recipe (configs/shapes.py: ResNet-18 with GroupNorm, a 64-channel FPN, AdamW, 4 images a step at a
192-pixel canvas) with one class, person, and both branches of the paper's Table 4 on: the per-class
mask head and a keypoint head of 13 one-hot 56 x 56 masks (4 convs of 64 channels instead of 8 of 512, to fit the
CPU). The figures (60-180 px on 256-320 px images, several per image, occluding each other, some crowds and empty
images) are written to data.stick_figures.dir and built into data.data_dir on the first run.
"""

import pathlib

from maskrcnn_jax import config as config_lib


def get_config():
    config = config_lib.load(pathlib.Path(__file__).with_name("shapes.py"))

    m = config.model
    m.num_classes = 2  # person + background
    m.keypoint_on = True
    m.keypoint_head.num_keypoints = 13
    m.keypoint_head.conv_dim = 64
    m.keypoint_head.num_convs = 4

    # The keypoint branch makes a step about 1.5x the shapes demo's (0.98 s against 0.65 s on 2 cores): 1,000 steps
    # with the decay at 850 keep the run within 20 minutes (1,200 steps, on a machine shared with other jobs, took
    # 25.5 minutes for AP^kp 0.59 and mask AP 0.54).
    t = config.train
    t.num_steps = 1000
    t.lr_steps = (850,)

    d = config.data
    d.name = "stick_figures"
    d.shapes.num_train = d.shapes.num_val = 0
    d.stick_figures.dir = "workdir/data/stick_figures"
    d.stick_figures.num_train = 2000
    d.stick_figures.num_val = 100
    return config
