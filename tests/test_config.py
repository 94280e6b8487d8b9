"""Configs: the base layout, the three config files, command-line overrides and rejected misspellings."""

import os
import sys

import pytest
from absl import flags

from maskrcnn_jax import config as config_lib
from maskrcnn_jax.engine import optim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from config_overrides import parse_config as parse  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_base_config_has_the_four_sections_and_validates():
    config = config_lib.base_config()
    assert set(config.keys()) >= {"model", "data", "train", "eval"}
    config_lib.validate(config)


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".py")))
def test_every_config_file_loads_and_validates(name):
    config = parse(name)
    config_lib.validate(config)
    assert config_lib.load(os.path.join(ROOT, "configs", name)).to_dict() == config.to_dict()


def test_coco_recipe_is_detectron2_1x():
    c = parse("coco_r50_fpn_1x.py")
    t = c.train
    assert (t.batch_size, t.base_lr, t.num_steps, tuple(t.lr_steps)) == (16, 0.02, 90_000, (60_000, 80_000))
    assert (t.warmup_steps, t.warmup_factor, t.momentum, t.weight_decay, t.optimizer) == (
        1000, 0.001, 0.9, 1e-4, "sgd")
    assert c.data.short_side == 800 and c.data.long_side_max == 1333
    assert c.data.short_side * c.data.scale_jitter[0] == pytest.approx(640)
    assert c.model.num_classes == 81


def test_overrides_take_effect_with_their_types():
    c = parse("test.py", "--config.train.base_lr=0.5", "--config.data.canvas_size=(64,96)",
              "--config.data.short_side=100", "--config.model.rpn.iou_thresholds=(0.2,0.8)",
              "--config.train.optimizer=adamw", "--config.train.eval_only=True")
    assert c.train.base_lr == 0.5
    assert tuple(c.data.canvas_size) == (64, 96)
    assert c.data.short_side == 100 and isinstance(c.data.short_side, int)
    assert tuple(c.model.rpn.iou_thresholds) == (0.2, 0.8)
    assert c.train.optimizer == "adamw" and c.train.eval_only is True


@pytest.mark.parametrize("override, message", [
    ("--config.train.base_rl=0.5", "base_lr"),  # misspelt leaf: the error suggests the right one
    ("--config.trian.base_lr=0.5", "train"),  # misspelt section
])
def test_misspelt_keys_are_rejected_with_a_suggestion(override, message):
    with pytest.raises((AttributeError, KeyError)) as error:
        parse("test.py", override)
    assert message in str(error.value)


def test_a_value_of_the_wrong_type_is_rejected():
    with pytest.raises(flags.IllegalFlagValueError):
        parse("test.py", "--config.train.base_lr=fast")


@pytest.mark.parametrize("field, value, message", [
    ("train.optimizer", "lamb", "optimizer"),
    ("train.lr_steps", (300, 200), "increasing"),
    ("data.canvas_size", (100, 128), "multiple"),
])
def test_validate_rejects_impossible_settings(field, value, message):
    config = parse("test.py")
    with config.unlocked():
        section, key = field.split(".")
        setattr(config[section], key, value)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


def test_config_files_train_what_their_dataset_has():
    # shapes: 5 classes + background; the training loop checks this against the built dataset too.
    assert parse("shapes.py").model.num_classes == 6
    assert parse("test.py").model.num_classes == 6
    assert optim.learning_rate_schedule(parse("shapes.py").train)(0) > 0


# The paper's Table 2a rows: (backbone.kind, depth, groups, width_per_group).
TABLE_2A = {
    "coco_r50_c4_1x.py": ("c4", 50, 1, 64),
    "coco_r101_c4_1x.py": ("c4", 101, 1, 64),
    "coco_r50_fpn_1x.py": ("fpn", 50, 1, 64),
    "coco_r101_fpn_1x.py": ("fpn", 101, 1, 64),
    "coco_x101_fpn_1x.py": ("fpn", 101, 32, 8),
}


@pytest.mark.parametrize("name", sorted(TABLE_2A))
def test_table_2a_configs_share_the_1x_recipe_and_differ_in_the_backbone(name):
    from maskrcnn_jax.modeling.mask_rcnn import mask_size

    config, recipe = parse(name), parse("coco_r50_fpn_1x.py")
    assert config.train.to_dict() == recipe.train.to_dict() and config.data.to_dict() == recipe.data.to_dict()
    b = config.model.backbone
    assert (b.kind, b.depth, b.groups, b.width_per_group) == TABLE_2A[name]
    m = config.model
    if b.kind == "c4":  # detectron2's Base-RCNN-C4: one stride-16 level, 15 anchors, 14 x 14 RoIs, 14 x 14 masks
        assert tuple(m.anchors.strides) == tuple(m.roi_heads.pool_strides) == (16,)
        assert tuple(m.anchors.sizes) == (32, 64, 128, 256, 512)
        assert (m.roi_heads.box_pool_size, m.roi_heads.mask_num_convs, mask_size(m)) == (14, 0, 14)
        assert (m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test) == (6000, 1000)
    else:
        assert m.to_dict() == {**recipe.model.to_dict(), "backbone": m.backbone.to_dict()}


@pytest.mark.parametrize("name, kind, stride", [("shapes_c4.py", "c4", 16), ("shapes_c5.py", "c5", 32)])
def test_shapes_single_level_configs_change_only_the_model(name, kind, stride):
    config, demo = parse(name), parse("shapes.py")
    assert config.train.to_dict() == demo.train.to_dict() and config.data.to_dict() == demo.data.to_dict()
    m = config.model
    assert m.backbone.kind == kind and m.backbone.depth == demo.model.backbone.depth
    assert tuple(m.anchors.strides) == tuple(m.roi_heads.pool_strides) == (stride,)
    assert tuple(m.anchors.sizes) == tuple(demo.model.anchors.sizes)
