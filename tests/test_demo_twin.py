"""benchmarks/demo_twin.py's torchvision twin: built to configs/shapes.py's values, with engine/optim.py's learning
rates, and its timed phases run (a dry run: one step each, on four generated images)."""

import importlib.util
import math
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "demo_twin.py"


@pytest.fixture(scope="module")
def twin():
    spec = importlib.util.spec_from_file_location("demo_twin", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_twin_mirrors_the_demo_config(twin):
    from maskrcnn_jax.engine import optim

    config = twin.load_config()
    m = config.model
    model = twin.build_twin(config)
    rpn, heads = model.rpn, model.roi_heads
    assert rpn._pre_nms_top_n == {"training": m.rpn.pre_nms_topk_train, "testing": m.rpn.pre_nms_topk_test}
    assert rpn._post_nms_top_n == {"training": m.rpn.post_nms_topk_train, "testing": m.rpn.post_nms_topk_test}
    assert rpn.fg_bg_sampler.batch_size_per_image == m.rpn.batch_size_per_image
    assert [s[0] for s in rpn.anchor_generator.sizes] == list(m.anchors.sizes)
    assert heads.fg_bg_sampler.batch_size_per_image == m.roi_heads.batch_size_per_image
    assert heads.detections_per_img == m.detection.detections_per_image
    assert heads.box_head.fc7.out_features == m.roi_heads.fc_dim
    mask_convs = [layer for layer in heads.mask_head.modules() if isinstance(layer, torch.nn.Conv2d)]
    assert [c.out_channels for c in mask_convs] == [m.roi_heads.mask_conv_dim] * m.roi_heads.mask_num_convs
    assert model.backbone.out_channels == m.backbone.fpn_channels
    assert all(not isinstance(layer, torch.nn.BatchNorm2d) for layer in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert model.transform.min_size == (config.data.canvas_size[0],)
    assert model.transform.size_divisible == config.data.canvas_size[0]

    optimizer, schedule = twin.twin_optimizer(model, config.train)
    ours = optim.learning_rate_schedule(config.train)
    t = config.train
    for step in (0, 1, 50, t.warmup_steps, t.lr_steps[-1] - 1, t.lr_steps[-1], t.lr_steps[-1] + 1):
        twin_lr = t.base_lr * schedule.lr_lambdas[0](step)
        assert math.isclose(twin_lr, float(ours(step)), rel_tol=1e-5), step
    assert [group["weight_decay"] for group in optimizer.param_groups] == [t.weight_decay, 0.0]


def test_twin_dry_run(twin, tmp_path):
    from maskrcnn_jax.data import synthetic

    paths = synthetic.generate(str(tmp_path), num_train=4, num_val=0, seed=0)
    result = twin.run_torchvision(paths, twin.load_config(), warmup=0, steps=1)
    for phase in ("loop", "step_alone", "backbone_alone", "input_alone"):
        assert np.all(np.isfinite(result[phase])) and result[phase][0] > 0
