"""Configs: the base layout, the three config files, command-line overrides and rejected misspellings."""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from maskrcnn_jax import config as config_lib
from maskrcnn_jax.engine import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(config_file, *overrides):
    argv = ["prog", f"--config={os.path.join(ROOT, 'configs', config_file)}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


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
