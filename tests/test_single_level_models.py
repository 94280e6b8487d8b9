"""The single-level models of the paper's Table 2: C4 (res5 as the RoI head, 14 x 14 masks) and C5 (stride 32, the
FPN-style heads on one level): their anchors, their wiring against the ops they are made of, one compile per train
step, and the mask size that predictions and targets follow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import ops
from maskrcnn_jax.ops.anchors import cell_anchors
from maskrcnn_jax.modeling.defaults import model_config
from maskrcnn_jax.modeling.heads import GlobalPoolBoxHead
from maskrcnn_jax.modeling.mask_rcnn import build_model, mask_size
from maskrcnn_jax.modeling.rpn import anchors_per_location, level_anchors

from tiny_model import CANVAS, make_example, split, stack, tiny_config

STRIDES = {"c4": 16, "c5": 32}


def tiny_single_level_config(kind):
    """The tiny ResNet-18-GN model on one level; one mask-RoI bucket keeps the compile short."""
    c = tiny_config()
    c.backbone.kind = kind
    c.anchors.strides = (STRIDES[kind],)
    c.roi_heads.pool_strides = (STRIDES[kind],)
    c.roi_heads.mask_roi_buckets = 1
    if kind == "c4":
        c.roi_heads.box_pool_size = 14
        c.roi_heads.mask_num_convs = 0
    return c


def test_single_level_anchors_are_detectron2s_cell_order():
    """C4: every size on the stride-16 level, each location's 15 anchors size-major then ratio (detectron2's
    DefaultAnchorGenerator order, which its C4 RPN weights expect), each cell anchor as ops' cell_anchors makes
    it."""
    sizes, ratios = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)
    assert anchors_per_location((16,), sizes, ratios) == 15
    assert anchors_per_location((4, 8, 16, 32, 64), sizes, ratios) == 3
    (anchors,) = level_anchors((48, 80), (16,), sizes, ratios)
    expected = []
    for y in range(3):
        for x in range(5):
            for size in sizes:
                for cell in cell_anchors(size, ratios):
                    expected.append(cell + np.array([16 * x, 16 * y, 16 * x, 16 * y], np.float32))
    np.testing.assert_array_equal(np.asarray(anchors), np.asarray(expected))
    # FPN: one size per level, as before.
    fpn = level_anchors((64, 64), (4, 8, 16, 32, 64), sizes, ratios)
    for ours, theirs in zip(fpn, ops.generate_anchors((64, 64), (4, 8, 16, 32, 64), sizes, ratios)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_mask_size_follows_the_head():
    c = model_config()
    assert mask_size(c) == 28
    c.roi_heads.mask_head = "mlp"
    assert mask_size(c) == build_model(c).mask_size == 28
    c4 = tiny_single_level_config("c4")
    assert mask_size(c4) == 14  # 14 x 14 pooling, res5 halves it, the transposed conv doubles it
    c4.roi_heads.box_pool_size = 7  # res5: 7 -> 4 (ceil), masks 8 x 8
    assert mask_size(c4) == 8
    assert mask_size(tiny_single_level_config("c5")) == 28


def test_backbone_kind_and_levels_are_checked():
    def init(config):
        model = build_model(config)
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 2), jnp.int32))

    c = tiny_single_level_config("c4")
    c.roi_heads.pool_strides = (4, 8, 16, 32)
    with pytest.raises(ValueError, match="pool_strides must be"):
        init(c)
    c = tiny_single_level_config("c5")
    c.anchors.strides = (16,)
    with pytest.raises(ValueError, match="one level at stride 32"):
        init(c)
    c = tiny_config()
    c.backbone.kind = "c3"
    with pytest.raises(ValueError, match="backbone.kind"):
        init(c)


def test_global_pool_box_head_reads_the_spatial_mean(rng):
    features = rng.standard_normal((2, 3, 7, 7, 16)).astype(np.float32)
    head = GlobalPoolBoxHead(num_classes=4)
    variables = head.init(jax.random.key(0), features)
    logits, deltas = head.apply(variables, features)
    mean = features.mean(axis=(2, 3))
    p = variables["params"]
    np.testing.assert_allclose(logits, mean @ p["cls_score"]["kernel"] + p["cls_score"]["bias"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(deltas, (mean @ p["bbox_pred"]["kernel"] + p["bbox_pred"]["bias"]).reshape(2, 3, 4, 4),
                               rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", params=["c4", "c5"])
def single_level(request):
    kind = request.param
    config = tiny_single_level_config(kind)
    model = build_model(config)
    # Jitted: an eager init runs every op of predict one by one, some 4x longer than compiling it on a CPU.
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *CANVAS, 3)), jnp.asarray([CANVAS], jnp.int32))
    return kind, config, model, variables


def test_masks_are_the_heads_on_one_level_roi_align(single_level, rng):
    """predict's masks equal the mask head applied by hand to RoIAlign on the backbone's one level at its stride:
    on C4, res5 of a 14 x 14 pooling (14 x 14 masks); on C5, a 14 x 14 pooling at stride 32 (28 x 28 masks)."""
    kind, config, model, variables = single_level
    r = config.roi_heads
    example, _ = make_example([(1, "box", 14, 20, 60, 70), (2, "ellipse", 70, 60, 120, 116)], rng)
    images, sizes = jnp.asarray(example["image"][None]), jnp.asarray(example["image_size"][None])

    def by_hand(module, images, sizes):
        out = module.predict(images, sizes)
        level = module.backbone(images)[kind].astype(jnp.float32)
        pool_size = r.box_pool_size if kind == "c4" else r.mask_pool_size
        pooled = ops.roi_align(level, out["boxes"], pool_size, 1 / STRIDES[kind], r.sampling_ratio, r.aligned)
        logits = module.mask_head(module.res5(pooled) if kind == "c4" else pooled)
        return out, logits

    out, logits = jax.jit(lambda v, x, s: model.apply(v, x, s, method=by_hand))(variables, images, sizes)
    side = mask_size(config)
    assert out["masks"].shape == (1, config.detection.detections_per_image, side, side)
    valid = np.asarray(out["valid"][0])
    assert valid.sum() > 0
    expected = jax.nn.sigmoid(jnp.take_along_axis(logits, out["classes"][..., None, None, None], axis=-1)[..., 0])
    np.testing.assert_allclose(np.asarray(out["masks"])[0][valid], np.asarray(expected)[0][valid], rtol=1e-4,
                               atol=1e-5)


def test_train_step_compiles_once_and_trains_every_part(single_level, rng):
    """One compile across instance counts; finite losses; a mask loss on 14 x 14 (C4) or 28 x 28 (C5) targets when
    there are objects; gradients reach the backbone, the RPN, res5 (C4) and both heads."""
    kind, _, model, variables = single_level
    params, other = split(variables)
    traces = []

    def loss_fn(params, batch, key):
        traces.append(1)
        return model.apply({"params": params, **other}, batch, key, method=model.losses)

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    layouts = [[], [(1, "box", 20, 30, 70, 90), (2, "ellipse", 60, 50, 120, 110)]]
    for i, shapes in enumerate(layouts):
        batch = stack([make_example(shapes, rng)[0]])
        (loss, parts), grads = step(params, batch, jax.random.key(i))
        assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in parts.values()), parts
        assert (float(parts["mask"]) > 0) == bool(shapes)
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert len(traces) == 1
    modules = {"backbone", "rpn_head", "box_head", "mask_head"} | ({"res5"} if kind == "c4" else set())
    assert set(grads) == modules
    for name in modules:
        assert any(np.abs(np.asarray(g)).sum() > 0 for g in jax.tree.leaves(grads[name])), name
