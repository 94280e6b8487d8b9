"""Crowd annotations as ignore regions (the default) or dropped (model.crowd_regions="drop", detectron2's and
torchvision's behaviour): the switch reaches both matchers, and crowd regions are never foreground."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import ops
from maskrcnn_jax.modeling.defaults import model_config
from maskrcnn_jax.modeling.mask_rcnn import build_model
from maskrcnn_jax.modeling.roi_heads import sample_rois
from maskrcnn_jax.modeling.rpn import rpn_losses


@pytest.mark.parametrize("regions, expected", [("ignore", 0.7), ("drop", None)])
def test_the_config_switch_gives_the_matchers_threshold(regions, expected):
    config = model_config()
    config.crowd_regions = regions
    assert build_model(config)._crowd_ioa_threshold() == expected
    config.crowd_regions = "keep"
    with pytest.raises(ValueError, match="crowd_regions"):
        build_model(config)._crowd_ioa_threshold()


def crowd_only_image(rng):
    anchors = ops.generate_anchors((128, 128), (8,), (32,), (1.0,))[0]
    gt_boxes = jnp.asarray([[20.0, 20.0, 100.0, 100.0], [0.0, 0.0, 0.0, 0.0]])
    return anchors, gt_boxes, jnp.asarray([True, False]), jnp.asarray([True, False])


def test_anchors_inside_a_crowd_region_are_ignored_or_negative(rng):
    anchors, gt_boxes, gt_valid, gt_is_crowd = crowd_only_image(rng)
    inside = np.asarray(ops.box_ioa(anchors, gt_boxes[:1])[:, 0] >= 0.7)
    assert inside.sum() > 10
    _, ignored = ops.match_boxes(gt_boxes, gt_valid, gt_is_crowd, anchors, crowd_ioa_threshold=0.7)
    _, dropped = ops.match_boxes(gt_boxes, gt_valid, gt_is_crowd, anchors, crowd_ioa_threshold=None)
    np.testing.assert_array_equal(np.asarray(ignored)[inside], -1)
    np.testing.assert_array_equal(np.asarray(dropped), 0)  # no foreground: everything is background

    # The RPN loss sees the difference: with the region dropped, anchors inside it are sampled as negatives.
    objectness = jnp.asarray(rng.normal(size=(1, anchors.shape[0])), jnp.float32)
    deltas = jnp.asarray(rng.normal(size=(1, anchors.shape[0], 4)), jnp.float32)
    losses = {threshold: rpn_losses(jax.random.key(0), objectness, deltas, anchors, gt_boxes[None], gt_valid[None],
                                    gt_is_crowd[None], batch_size_per_image=anchors.shape[0],
                                    crowd_ioa_threshold=threshold)
              for threshold in (0.7, None)}
    x = np.asarray(objectness[0], np.float64)
    negative_bce = np.log1p(np.exp(x))  # BCE of a negative anchor
    normalizer = anchors.shape[0]
    assert float(losses[None]["rpn_cls"]) == pytest.approx(negative_bce.sum() / normalizer, rel=1e-5)
    assert float(losses[0.7]["rpn_cls"]) == pytest.approx(negative_bce[~inside].sum() / normalizer, rel=1e-5)


def test_proposals_inside_a_crowd_region_are_never_foreground(rng):
    _, gt_boxes, gt_valid, gt_is_crowd = crowd_only_image(rng)
    proposals = jnp.asarray([[25.0, 25.0, 95.0, 95.0], [30.0, 30.0, 60.0, 60.0], [100.0, 100.0, 127.0, 127.0]])
    for threshold in (0.7, None):
        sampled = sample_rois(jax.random.key(1), proposals[None], jnp.ones((1, 3), bool), gt_boxes[None],
                              jnp.asarray([[1, 0]]), gt_valid[None], gt_is_crowd[None], batch_size_per_image=4,
                              crowd_ioa_threshold=threshold)
        assert not np.asarray(sampled["positive"]).any()
        sampled_inside = np.asarray(sampled["valid"][0]) & (np.asarray(sampled["rois"][0, :, 0]) < 90)
        # Ignored (not sampled) with the threshold, sampled as background without it.
        assert sampled_inside.any() == (threshold is None)
