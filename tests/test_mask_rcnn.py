"""The whole model: size against torchvision and detectron2, the RoI-op switch, one compile across instance counts,
edge cases, and learning."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maskrcnn_jax import config as config_lib
from maskrcnn_jax import ops
from maskrcnn_jax.modeling.defaults import model_config
from maskrcnn_jax.modeling.mask_rcnn import build_model

from detectron2_zoo import detectron2_c4_zoo_shapes, is_frozen_bn_buffer
from tiny_model import CANVAS, make_example, split, stack, tiny_config

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    model = build_model(config)
    images = jnp.zeros((1, *CANVAS, 3))
    sizes = jnp.asarray([CANVAS], jnp.int32)
    variables = model.init(jax.random.key(0), images, sizes)
    return model, variables


@pytest.fixture(scope="module")
def loss_and_grad(tiny):
    model, _ = tiny
    traces = []

    def loss_fn(params, other, batch, key):
        traces.append(1)  # runs once per trace, i.e. once per compile
        return model.apply({"params": params, **other}, batch, key, method=model.losses)

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    return step, traces


def test_size_matches_torchvision_maskrcnn_resnet50_fpn():
    config = model_config()
    config.backbone.freeze_at = 0
    model = build_model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 2), jnp.int32))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    assert set(shapes) == {"params", "batch_stats"}
    assert count(shapes["params"]) == 44_401_393
    assert count(shapes["batch_stats"]) == 106_240
    assert count(shapes) == 44_507_633


def test_size_matches_detectron2_mask_rcnn_r50_c4():
    """configs/coco_r50_c4_1x.py against detectron2's R50-C4 Mask R-CNN (Res5ROIHeads, 80 classes), counted from
    its layer shapes (tests/detectron2_zoo.py): backbone to res4 8,512,704, RPN on res4 9,515,083, res5 14,942,208,
    box predictor on 2048 channels 821,649, mask head 2,097,408 + 20,560. Ours has its parameters plus the zero
    background slots of the box regressor (2048 x 4 + 4) and of the mask predictor (256 + 1); its FrozenBN buffers
    are our batch_stats."""
    config = config_lib.load(CONFIGS / "coco_r50_c4_1x.py").model
    shapes = jax.eval_shape(build_model(config).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                            jnp.zeros((1, 2), jnp.int32))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    detectron2 = {name: shape for name, shape in detectron2_c4_zoo_shapes(50, 80).items()
                  if not name.startswith("pixel_")}
    weights = sum(int(np.prod(shape)) for name, shape in detectron2.items() if not is_frozen_bn_buffer(name))
    buffers = sum(int(np.prod(shape)) for name, shape in detectron2.items() if is_frozen_bn_buffer(name))
    assert weights == 35_909_612 and buffers == 106_240
    assert count(shapes["params"]) == weights + 2048 * 4 + 4 + 256 + 1 == 35_918_065
    assert count(shapes["batch_stats"]) == buffers


ROI_EXTRACTIONS = [
    ("align", None, lambda f, b, s, r: ops.multilevel_roi_align(f, b, s, r.pool_strides, r.sampling_ratio, r.aligned)),
    ("align", "max", lambda f, b, s, r: ops.multilevel_roi_align(f, b, s, r.pool_strides, r.sampling_ratio, r.aligned,
                                                                 roi_reduce="max")),
    ("warp", None, lambda f, b, s, r: ops.multilevel_roi_warp(f, b, s, r.pool_strides, r.sampling_ratio)),
    ("warp", "max", lambda f, b, s, r: ops.multilevel_roi_warp(f, b, s, r.pool_strides, r.sampling_ratio,
                                                               roi_reduce="max")),
    ("pool", None, lambda f, b, s, r: ops.multilevel_roi_pool(f, b, s, r.pool_strides)),
]


def pool_with(config, levels, boxes, output_size):
    """The model's RoI feature extraction (MaskRCNN._pool, which holds no variables) on given levels and boxes."""
    model = build_model(config)

    def pool(module, levels, boxes):
        return module._pool(module._pooled_levels(levels), boxes, output_size)

    return model.apply({}, levels, boxes, method=pool)


def random_boxes(rng, count, side):
    xy = rng.uniform(0, side * 0.7, (1, count, 2))
    wh = rng.uniform(4, side * 0.5, (1, count, 2))
    return jnp.asarray(np.concatenate([xy, xy + wh], axis=-1), jnp.float32)


@pytest.mark.parametrize("roi_op, roi_reduce, reference", ROI_EXTRACTIONS)
def test_roi_op_and_roi_reduce_pick_the_op(rng, roi_op, roi_reduce, reference):
    """model.roi_heads.roi_op / roi_reduce (the paper's Table 2c) select the op; every choice pools differently."""
    config = tiny_config()
    config.roi_heads.roi_op, config.roi_heads.roi_reduce = roi_op, roi_reduce
    levels = [jnp.asarray(rng.standard_normal((1, 64 // s, 64 // s, 8)), jnp.float32) for s in (4, 8, 16, 32)]
    boxes = random_boxes(rng, 12, 64)
    ours = pool_with(config, levels, boxes, 7)
    np.testing.assert_array_equal(ours, reference(levels, boxes, 7, config.roi_heads))
    for other_op, other_reduce, other in ROI_EXTRACTIONS:
        if (other_op, other_reduce) != (roi_op, roi_reduce):
            assert not np.allclose(ours, other(levels, boxes, 7, config.roi_heads)), (other_op, other_reduce)


@pytest.mark.parametrize("roi_op, roi_reduce, reference", [
    ("align", "max", lambda f, b, r: ops.roi_align(f, b, 14, 1 / 16, r.sampling_ratio, r.aligned, roi_reduce="max")),
    ("warp", None, lambda f, b, r: ops.roi_warp(f, b, 14, 1 / 16, r.sampling_ratio)),
    ("pool", None, lambda f, b, r: ops.roi_pool(f, b, 14, 1 / 16)),
])
def test_single_level_pooling_is_the_single_level_op(rng, roi_op, roi_reduce, reference):
    """On C4 every box pools from the one stride-16 map, exactly as the single-level op does."""
    config = tiny_config()
    config.backbone.kind = "c4"
    config.anchors.strides = config.roi_heads.pool_strides = (16,)
    config.roi_heads.roi_op, config.roi_heads.roi_reduce = roi_op, roi_reduce
    level = jnp.asarray(rng.standard_normal((1, 6, 8, 8)), jnp.float32)
    boxes = random_boxes(rng, 12, 96)
    np.testing.assert_array_equal(pool_with(config, [level], boxes, 14), reference(level, boxes, config.roi_heads))


@pytest.mark.parametrize("roi_op, roi_reduce, message", [
    ("pool", "max", "roi_reduce applies to 'align' and 'warp'"),
    ("pool", "avg", "roi_reduce applies to 'align' and 'warp'"),
    ("align", "median", "roi_reduce must be one of"),
    ("crop", None, "roi_op must be one of"),
])
def test_roi_extraction_rejects_other_settings(roi_op, roi_reduce, message):
    config = tiny_config()
    config.roi_heads.roi_op, config.roi_heads.roi_reduce = roi_op, roi_reduce
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(build_model(config).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                       jnp.zeros((1, 2), jnp.int32))


def test_train_step_compiles_once_across_instance_counts(tiny, loss_and_grad, rng):
    _, variables = tiny
    params, other = split(variables)
    step, traces = loss_and_grad
    before = len(traces)
    layouts = [
        [],
        [(1, "box", 20, 30, 70, 90)],
        [(1, "box", 10, 10, 50, 40), (2, "ellipse", 60, 50, 120, 110), (2, "ellipse", 5, 70, 45, 120)],
    ]
    for i, shapes in enumerate(layouts):
        batch = stack([make_example(shapes, rng)[0]])
        (loss, parts), grads = step(params, other, batch, jax.random.key(i))
        assert np.isfinite(float(loss)), parts
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert len(traces) - before <= 1


def test_empty_and_crowd_only_images_give_finite_losses_and_gradients(tiny, loss_and_grad, rng):
    _, variables = tiny
    params, other = split(variables)
    step, _ = loss_and_grad
    empty, _ = make_example([], rng)
    crowd_only, _ = make_example([(1, "box", 20, 20, 100, 100)], rng, crowd=(0,))
    for example in (empty, crowd_only):
        (loss, parts), grads = step(params, other, stack([example]), jax.random.key(3))
        assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in parts.values())
        # With nothing to find, no mask or box regression loss may arise.
        assert float(parts["mask"]) == 0.0 and float(parts["box_reg"]) == 0.0 and float(parts["rpn_box"]) == 0.0
        leaves = jax.tree.leaves(grads)
        assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
        assert any(np.abs(np.asarray(g)).sum() > 0 for g in leaves)


def test_mask_roi_buckets_give_the_loss_and_gradients_of_the_full_mask_batch(tiny, loss_and_grad, rng):
    # The default runs the mask head on the smallest prefix of 2, 4, 8 or 16 sampled RoIs that holds every
    # positive; one bucket always runs all 16. Layouts from no object to four give different positive counts.
    model, variables = tiny
    params, other = split(variables)
    bucketed, _ = loss_and_grad
    config = tiny_config()
    config.roi_heads.mask_roi_buckets = 1
    full_model = build_model(config)
    full = jax.jit(jax.value_and_grad(
        lambda params, batch, key: full_model.apply({"params": params, **other}, batch, key, method=full_model.losses),
        has_aux=True,
    ))
    layouts = [
        [],
        [(1, "box", 30, 30, 60, 70)],
        [(1, "box", 4, 6, 120, 124), (2, "ellipse", 10, 10, 60, 50), (2, "ellipse", 70, 64, 118, 120),
         (1, "box", 40, 80, 90, 126)],
    ]
    for i, shapes in enumerate(layouts):
        batch = stack([make_example(shapes, rng)[0]])
        (loss, parts), grads = bucketed(params, other, batch, jax.random.key(i))
        (full_loss, full_parts), full_grads = full(params, batch, jax.random.key(i))
        assert i == 0 or float(parts["mask"]) > 0
        np.testing.assert_allclose(float(parts["mask"]), float(full_parts["mask"]), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-5)
        jax.tree.map(lambda g, f: np.testing.assert_allclose(g, f, rtol=1e-4, atol=1e-6), grads, full_grads)


def mask_iou(a, b):
    return np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1)


def test_overfits_two_images_and_finds_every_object(tiny, rng):
    model, variables = tiny
    params, other = split(variables)
    layouts = [
        [(1, "box", 14, 20, 60, 70), (2, "ellipse", 70, 60, 120, 116)],
        [(2, "ellipse", 10, 12, 70, 56), (1, "box", 64, 70, 110, 118)],
    ]
    examples, full_masks = zip(*(make_example(shapes, rng) for shapes in layouts))
    batch = stack(examples)
    steps = 80
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, 10, steps, end_value=1e-4)
    optimizer = optax.chain(optax.clip_by_global_norm(5.0), optax.adam(schedule))

    @jax.jit
    def train_step(params, opt_state, key):
        def loss_fn(params):
            return model.apply({"params": params, **other}, batch, key, method=model.losses)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, parts

    opt_state = optimizer.init(params)
    losses = []
    for step in range(steps):
        params, opt_state, loss, parts = train_step(params, opt_state, jax.random.key(step))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] * 5 <= losses[0], (losses[0], losses[-1], {k: float(v) for k, v in parts.items()})

    out = jax.jit(lambda p, images, sizes: model.apply({"params": p, **other}, images, sizes, method=model.predict))(
        params, batch["image"], batch["image_size"]
    )
    for i, (shapes, masks) in enumerate(zip(layouts, full_masks)):
        valid = np.asarray(out["valid"][i])
        pasted = np.asarray(ops.paste_masks(out["masks"][i], out["boxes"][i], CANVAS))
        classes = np.asarray(out["classes"][i])
        for (label, *_), truth in zip(shapes, masks):
            candidates = [mask_iou(pasted[d], truth) for d in np.flatnonzero(valid & (classes == label))]
            assert candidates and max(candidates) >= 0.8, (i, label, candidates)


@pytest.mark.parametrize("decoding", ["versus_background", "class_probability"])
def test_softmax_masks_are_decoded_as_configured(tiny, rng, decoding):
    # The per-class heads of both mask losses have the same parameters, so the tiny model's serve a softmax config.
    _, variables = tiny
    config = tiny_config()
    config.roi_heads.mask_loss = "softmax"
    config.roi_heads.softmax_mask_decoding = decoding
    model = build_model(config)

    def predict_and_mask_logits(module, images, sizes):
        out = module.predict(images, sizes)
        pyramid = module._pooled_levels(module._features(images, train=False))
        return out, module.mask_head(module._mask_features(pyramid, out["boxes"], train=False))

    images = rng.normal(0, 1, (1, *CANVAS, 3)).astype(np.float32)
    out, logits = jax.jit(lambda v, i, s: model.apply(v, i, s, method=predict_and_mask_logits))(
        variables, images, jnp.asarray([CANVAS], jnp.int32))
    p = jax.nn.softmax(np.asarray(logits, np.float64), axis=-1)
    p_class = np.take_along_axis(p, np.asarray(out["classes"])[..., None, None, None], axis=-1)[..., 0]
    want = p_class / (p_class + p[..., 0]) if decoding == "versus_background" else p_class
    np.testing.assert_allclose(out["masks"], want, rtol=1e-5, atol=1e-6)


def test_an_unknown_softmax_mask_decoding_is_an_error():
    config = tiny_config()
    config.roi_heads.softmax_mask_decoding = "argmax"
    with pytest.raises(ValueError, match="softmax_mask_decoding"):
        build_model(config).init(jax.random.key(0), jnp.zeros((1, *CANVAS, 3)), jnp.asarray([CANVAS], jnp.int32))


def overfit_losses(config, batch, steps):
    """The training losses of `steps` Adam steps on one fixed batch, from the tiny model's fixed initialisation."""
    model = build_model(config)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *CANVAS, 3)), jnp.asarray([CANVAS], jnp.int32))
    params, other = split(variables)
    optimizer = optax.chain(optax.clip_by_global_norm(5.0), optax.adam(1e-3))

    @jax.jit
    def train_step(params, opt_state, key):
        (loss, _), grads = jax.value_and_grad(
            lambda p: model.apply({"params": p, **other}, batch, key, method=model.losses), has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    opt_state, losses = optimizer.init(params), []
    for step in range(steps):
        params, opt_state, loss, grad_norm = train_step(params, opt_state, jax.random.key(step))
        assert np.isfinite(float(loss)) and np.isfinite(float(grad_norm)), step
        losses.append(float(loss))
    return np.asarray(losses)


def test_bfloat16_trains_like_float32(rng):
    """model.dtype="bfloat16" through the whole loss and gradient: finite at every step, and on the tiny overfit set
    the loss falls as it does in float32 (losses, box decoding, NMS and RoI pooling stay float32)."""
    layouts = [[(1, "box", 14, 20, 60, 70), (2, "ellipse", 70, 60, 120, 116)]]
    batch = stack([make_example(shapes, rng)[0] for shapes in layouts])
    config = tiny_config()
    float32 = overfit_losses(config, batch, 25)
    config.dtype = "bfloat16"
    bfloat16 = overfit_losses(config, batch, 25)
    assert bfloat16[0] == pytest.approx(float32[0], rel=0.05)
    assert float32[-5:].mean() * 2 <= float32[:5].mean()
    assert bfloat16[-5:].mean() * 2 <= bfloat16[:5].mean()
    assert bfloat16[-5:].mean() <= 1.25 * float32[-5:].mean()


def test_roi_pooling_gathers_in_float32_under_bfloat16(rng):
    """As torch's autocast runs roi_align in float32: the pyramid RoI pooling reads is float32 whatever the compute
    dtype, and the pooled features reach the heads in the compute dtype."""
    config = tiny_config()
    config.dtype = "bfloat16"
    model = build_model(config)
    levels = [jnp.asarray(rng.normal(size=(1, 32 // 2 ** i, 32 // 2 ** i, 8)), jnp.bfloat16) for i in range(5)]
    boxes = jnp.asarray([[[2.0, 3.0, 20.0, 25.0]]])

    def pooled(module):
        pyramid = module._pooled_levels(levels)
        return pyramid.flat.dtype, module._pool(pyramid, boxes, 7).dtype

    flat_dtype, pooled_dtype = model.apply({}, method=pooled)
    assert flat_dtype == jnp.float32 and pooled_dtype == jnp.bfloat16


def test_deconv2x2_matches_torch_conv_transpose(rng):
    torch = pytest.importorskip("torch")
    from maskrcnn_jax.layers.deconv import Deconv2x2

    x = rng.standard_normal((3, 5, 6, 8)).astype(np.float32)
    module = Deconv2x2(4)
    variables = module.init(jax.random.key(0), x)
    variables = {"params": {"kernel": rng.standard_normal((2, 2, 8, 4)).astype(np.float32),
                            "bias": rng.standard_normal(4).astype(np.float32)}}
    ours = np.asarray(module.apply(variables, x))
    deconv = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
    with torch.no_grad():
        deconv.weight.copy_(torch.from_numpy(variables["params"]["kernel"].transpose(2, 3, 0, 1)))
        deconv.bias.copy_(torch.from_numpy(variables["params"]["bias"]))
        expected = deconv(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
