"""The keypoint head against torchvision's KeypointRCNNHeads + KeypointRCNNPredictor, and the keypoint branch of the
model: its loss, its static shapes, and the switches that turn the mask and keypoint branches on and off."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from maskrcnn_jax import ops
from maskrcnn_jax.layers.deconv import ConvTranspose
from maskrcnn_jax.modeling.defaults import model_config
from maskrcnn_jax.modeling.heads import FCNMaskHead
from maskrcnn_jax.modeling.keypoint_head import KeypointHead, upsample_bilinear_2x
from maskrcnn_jax.modeling.mask_rcnn import build_model

CANVAS = (96, 96)
K = 3


@pytest.mark.parametrize("in_conditional_branch", [False, True], ids=["top-level", "in-conditional-branch"])
def test_conv_transpose_and_its_gradients_match_torch(rng, in_conditional_branch):
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(2, 7, 9, 5)).astype(np.float32)
    module = ConvTranspose(3, 4, 2, 1, in_conditional_branch=in_conditional_branch)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x))
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)
    cotangent = rng.normal(size=(2, 14, 18, 3)).astype(np.float32)
    ours, pullback = jax.vjp(jax.jit(module.apply), variables, jnp.asarray(x))
    variable_grads, x_grad = pullback(jnp.asarray(cotangent))

    reference = torch.nn.ConvTranspose2d(5, 3, 4, stride=2, padding=1)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(np.asarray(variables["params"]["kernel"]).transpose(2, 3, 0, 1)))
        reference.bias.copy_(torch.tensor(np.asarray(variables["params"]["bias"])))
    x_t = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
    expected = reference(x_t)
    expected.backward(torch.tensor(cotangent).permute(0, 3, 1, 2))
    assert ours.shape == (2, 14, 18, 3)
    np.testing.assert_allclose(ours, expected.detach().permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_grad, x_t.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(variable_grads["params"]["kernel"],
                               reference.weight.grad.numpy().transpose(2, 3, 0, 1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(variable_grads["params"]["bias"], reference.bias.grad.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("head", ["mask", "keypoint"])
def test_heads_train_inside_a_switch_on_forward_convolutions_and_matmuls(rng, head):
    # In training both heads run inside the RoI buckets' lax.switch, where XLA's CPU weight-gradient and
    # transposed convolutions are some 500x slower than at the top level (layers/conv.py).
    if head == "mask":
        module = FCNMaskHead(num_masks=3, conv_dim=8, num_convs=2)
    else:
        module = KeypointHead(num_keypoints=3, conv_dim=8, num_convs=2)
    x = jnp.asarray(rng.normal(size=(4, 7, 7, 8)), jnp.float32)
    variables = module.init(jax.random.key(0), x)
    grad = jax.grad(lambda variables, x: jnp.sum(jnp.sin(module.apply(variables, x))), argnums=(0, 1))
    no_grad = lambda variables, x: jax.tree.map(jnp.zeros_like, (variables, x))  # noqa: E731
    in_switch = jax.jit(lambda index, variables, x: lax.switch(index, [grad, no_grad], variables, x))
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5),
                 in_switch(0, variables, x), jax.jit(grad)(variables, x))
    hlo = in_switch.lower(0, variables, x).compile().as_text()
    assert set(re.findall(r"convolution\(.*?dim_labels=(\S+?),", hlo)) == {"b01f_01io->b01f"}


def test_bilinear_upsampling_matches_torch_interpolate(rng):
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(3, 5, 8, 4)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.tensor(x).permute(0, 3, 1, 2), scale_factor=2, mode="bilinear",
                                               align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(upsample_bilinear_2x(jnp.asarray(x))), expected, rtol=1e-6, atol=1e-6)


def test_keypoint_head_matches_torchvision(rng):
    """torchvision's KeypointRCNNHeads (8 x conv 3x3 512 + ReLU) and KeypointRCNNPredictor (a 4x4 stride-2
    transposed conv, then bilinear x2), with our variables copied in, on random RoI features."""
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor

    channels, conv_dim, num_convs = 16, 24, 3
    x = rng.normal(size=(4, 14, 14, channels)).astype(np.float32)
    head = KeypointHead(num_keypoints=K, conv_dim=conv_dim, num_convs=num_convs)
    shapes = jax.eval_shape(head.init, jax.random.key(0), jnp.asarray(x))
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, size=s.shape), jnp.float32), shapes)
    ours = np.asarray(head.apply(variables, jnp.asarray(x)))

    convs = KeypointRCNNHeads(channels, (conv_dim,) * num_convs)
    predictor = KeypointRCNNPredictor(conv_dim, K)
    params = variables["params"]
    with torch.no_grad():
        for i in range(num_convs):
            convs[2 * i].weight.copy_(torch.tensor(np.asarray(params[f"conv_fcn{i + 1}"]["kernel"]).transpose(3, 2, 0, 1)))
            convs[2 * i].bias.copy_(torch.tensor(np.asarray(params[f"conv_fcn{i + 1}"]["bias"])))
        predictor.kps_score_lowres.weight.copy_(
            torch.tensor(np.asarray(params["score_lowres"]["kernel"]).transpose(2, 3, 0, 1)))
        predictor.kps_score_lowres.bias.copy_(torch.tensor(np.asarray(params["score_lowres"]["bias"])))
        expected = predictor(convs(torch.tensor(x).permute(0, 3, 1, 2))).permute(0, 2, 3, 1).numpy()
    assert ours.shape == expected.shape == (4, 56, 56, K)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def tiny_config(mask_on=True, keypoint_on=True):
    c = model_config()
    c.num_classes = 2
    c.backbone.depth = 18
    c.backbone.norm = "gn"
    c.backbone.freeze_at = 0
    c.backbone.fpn_channels = 32
    c.anchors.sizes = (16, 32, 64, 128, 256)
    c.rpn.pre_nms_topk_train = c.rpn.pre_nms_topk_test = 200
    c.rpn.post_nms_topk_train = c.rpn.post_nms_topk_test = 50
    c.rpn.batch_size_per_image = 64
    c.roi_heads.batch_size_per_image = 32
    c.roi_heads.fc_dim = 64
    c.roi_heads.mask_conv_dim = 16
    c.roi_heads.mask_num_convs = 1
    c.roi_heads.mask_roi_buckets = 1  # one compiled size: this file tests the branch, not the buckets
    c.detection.detections_per_image = 10
    c.detection.pre_nms_topk = 200
    c.mask_on, c.keypoint_on = mask_on, keypoint_on
    c.keypoint_head.num_keypoints = K
    c.keypoint_head.conv_dim = 16
    c.keypoint_head.num_convs = 2
    return c


def batch_with_people(rng, people):
    """One image with `people` boxes and K keypoints each (one of them not visible), padded to 4 instances."""
    g = 4
    batch = {
        "image": rng.normal(size=(1, *CANVAS, 3)).astype(np.float32),
        "image_size": np.asarray([CANVAS], np.int32),
        "gt_boxes": np.zeros((1, g, 4), np.float32),
        "gt_classes": np.zeros((1, g), np.int32),
        "gt_is_crowd": np.zeros((1, g), bool),
        "gt_valid": np.zeros((1, g), bool),
        "gt_masks": np.zeros((1, g, 14, 14), np.float32),
        "gt_keypoints": np.zeros((1, g, K, 3), np.float32),
    }
    for i in range(people):
        x1, y1 = rng.uniform(0, 40, 2)
        x2, y2 = x1 + rng.uniform(25, 50), y1 + rng.uniform(25, 50)
        batch["gt_boxes"][0, i] = (x1, y1, x2, y2)
        batch["gt_classes"][0, i], batch["gt_valid"][0, i] = 1, True
        batch["gt_masks"][0, i] = 1.0
        batch["gt_keypoints"][0, i, :, 0] = rng.uniform(x1, x2, K)
        batch["gt_keypoints"][0, i, :, 1] = rng.uniform(y1, y2, K)
        batch["gt_keypoints"][0, i, :, 2] = [2, 1, 0]
        batch["gt_keypoints"][0, i, 2, :2] = 0
    return batch


@pytest.fixture(scope="module")
def keypoint_model():
    model = build_model(tiny_config())
    variables = model.init(jax.random.key(0), jnp.zeros((1, *CANVAS, 3)), jnp.asarray([CANVAS], jnp.int32))
    traces = []

    def loss_fn(params, other, batch, key):
        traces.append(1)
        return model.apply({"params": params, **other}, batch, key, method=model.losses)

    return model, variables, jax.jit(jax.value_and_grad(loss_fn, has_aux=True)), traces


def test_the_keypoint_branch_trains_with_one_compile_and_no_loss_without_people(keypoint_model, rng):
    model, variables, step, traces = keypoint_model
    params, other = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    assert "keypoint_head" in params and "mask_head" in params
    before = len(traces)
    for people in (0, 1, 3):
        (loss, parts), grads = step(params, other, batch_with_people(rng, people), jax.random.key(people))
        assert set(parts) == {"rpn_cls", "rpn_box", "box_cls", "box_reg", "mask", "keypoint"}
        assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
        if people == 0:
            assert float(parts["keypoint"]) == 0.0
            assert not np.any(np.asarray(grads["keypoint_head"]["conv_fcn1"]["kernel"]))
        else:
            assert float(parts["keypoint"]) > 1.0  # a cross-entropy over 56 * 56 positions, untrained
            assert np.any(np.asarray(grads["keypoint_head"]["conv_fcn1"]["kernel"]))
    assert len(traces) - before == 1


def test_prediction_carries_heatmaps_for_every_detection(keypoint_model, rng):
    model, variables, _, _ = keypoint_model
    batch = batch_with_people(rng, 2)
    out = model.apply(variables, jnp.asarray(batch["image"]), jnp.asarray(batch["image_size"]), method=model.predict)
    assert out["keypoint_heatmaps"].shape == (1, 10, 56, 56, K) and out["keypoint_heatmaps"].dtype == jnp.float32
    assert out["masks"].shape == (1, 10, 28, 28)


@pytest.mark.parametrize("mask_on, keypoint_on", [(False, True), (True, False), (False, False)])
def test_mask_and_keypoint_branches_switch_on_and_off(rng, mask_on, keypoint_on):
    """The paper's Table 4 rows are configs: keypoints only, masks only, or neither (Faster R-CNN)."""
    model = build_model(tiny_config(mask_on, keypoint_on))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *CANVAS, 3)), jnp.asarray([CANVAS], jnp.int32))
    assert ("mask_head" in shapes["params"]) == mask_on
    assert ("keypoint_head" in shapes["params"]) == keypoint_on
    batch = batch_with_people(rng, 1)
    _, parts = jax.eval_shape(lambda v: model.apply(v, batch, jax.random.key(0), method=model.losses), shapes)
    assert ("mask" in parts) == mask_on and ("keypoint" in parts) == keypoint_on


def test_keypoint_loss_is_the_cross_entropy_of_the_matched_keypoints(keypoint_model, rng):
    """The model's keypoint loss equals ops.keypoint_loss on the head's own logits for the positive RoIs' matched
    ground truth, recomputed here from the sampled RoIs."""
    model, variables, _, _ = keypoint_model
    batch = batch_with_people(rng, 2)
    c = model.config

    def pieces(module):
        levels = module._features(jnp.asarray(batch["image"]), True)
        _, _, proposals, proposal_valid = module._proposals(levels, batch["image"], batch["image_size"], True)
        from maskrcnn_jax.modeling.roi_heads import sample_rois

        sampled = sample_rois(jax.random.key(5), proposals, proposal_valid, batch["gt_boxes"], batch["gt_classes"],
                              batch["gt_valid"], batch["gt_is_crowd"], batch_size_per_image=32)
        pyramid = module._pooled_levels(levels)
        size = 8
        rois, positive = sampled["rois"][:, :size], sampled["positive"][:, :size]
        matched = sampled["matched_gt"][:, :size]
        loss = module._keypoint_loss(pyramid, rois, positive, matched, jnp.asarray(batch["gt_keypoints"]))
        logits = module.keypoint_head(module._pool(pyramid, rois, c.keypoint_head.pool_size))
        return loss, logits, rois, positive, matched

    loss, logits, rois, positive, matched = model.apply(variables, method=pieces)
    keypoints = np.asarray(batch["gt_keypoints"])[0][np.asarray(matched[0])]
    target, valid = ops.keypoint_targets(jnp.asarray(keypoints), rois[0], 56)
    valid = np.asarray(valid) & np.asarray(positive[0])[:, None]
    assert valid.sum() > 0
    flat = np.asarray(logits[0], np.float64).transpose(0, 3, 1, 2).reshape(8, K, -1)
    log_probs = flat - np.log(np.exp(flat - flat.max(-1, keepdims=True)).sum(-1, keepdims=True)) - flat.max(
        -1, keepdims=True)
    picked = np.take_along_axis(log_probs, np.asarray(target)[..., None], -1)[..., 0]
    assert float(loss) == pytest.approx(-picked[valid].mean(), rel=1e-5)
