import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops.losses import (
    sigmoid_binary_cross_entropy,
    sigmoid_mask_loss,
    smooth_l1_loss,
    softmax_cross_entropy,
    softmax_mask_loss,
    softmax_mask_probability,
)

RTOL = 1e-5
ATOL = 1e-6


def _logits(rng, shape, scale=4.0):
    return (rng.normal(0, scale, shape)).astype(np.float32)


def test_sigmoid_bce_matches_torch(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    logits = _logits(rng, (40, 7), scale=10.0)  # includes saturated logits
    targets = rng.uniform(0, 1, (40, 7)).astype(np.float32)
    valid = rng.uniform(size=40) < 0.6
    t_logits, t_targets = torch.tensor(logits), torch.tensor(targets)
    np.testing.assert_allclose(float(sigmoid_binary_cross_entropy(logits, targets)),
                               F.binary_cross_entropy_with_logits(t_logits, t_targets).item(), rtol=RTOL)
    want_sum = F.binary_cross_entropy_with_logits(t_logits[valid], t_targets[valid], reduction="sum").item()
    np.testing.assert_allclose(float(sigmoid_binary_cross_entropy(logits, targets, valid, normalizer=1)), want_sum,
                               rtol=RTOL)
    np.testing.assert_allclose(float(sigmoid_binary_cross_entropy(logits, targets, valid)),
                               want_sum / (valid.sum() * 7), rtol=RTOL)
    np.testing.assert_allclose(float(sigmoid_binary_cross_entropy(logits, targets, valid, normalizer=256)),
                               want_sum / 256, rtol=RTOL)


def test_sigmoid_bce_closed_form(rng):
    logits = _logits(rng, (50,), scale=3.0).astype(np.float64)
    targets = (rng.uniform(size=50) < 0.5).astype(np.float64)
    p = 1 / (1 + np.exp(-logits))
    want = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean()
    np.testing.assert_allclose(float(sigmoid_binary_cross_entropy(logits, targets)), want, rtol=RTOL)


def test_softmax_cross_entropy_matches_torch(rng):
    torch = pytest.importorskip("torch")
    logits = _logits(rng, (64, 11))
    labels = rng.integers(0, 11, 64)
    valid = rng.uniform(size=64) < 0.7
    labels_with_junk = np.where(valid, labels, 999)  # labels of invalid entries are never read
    want = torch.nn.functional.cross_entropy(torch.tensor(logits[valid]), torch.tensor(labels[valid])).item()
    np.testing.assert_allclose(float(softmax_cross_entropy(logits, labels_with_junk, valid)), want, rtol=RTOL)
    want_all = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels)).item()
    np.testing.assert_allclose(float(softmax_cross_entropy(logits, labels)), want_all, rtol=RTOL)


@pytest.mark.parametrize("beta", [0.0, 1.0 / 9, 0.5, 1.0])
def test_smooth_l1_matches_torch(rng, beta):
    torch = pytest.importorskip("torch")
    pred = rng.normal(0, 1, (100, 4)).astype(np.float32)
    target = rng.normal(0, 1, (100, 4)).astype(np.float32)
    valid = rng.uniform(size=100) < 0.5
    want = torch.nn.functional.smooth_l1_loss(torch.tensor(pred[valid]), torch.tensor(target[valid]), beta=beta,
                                              reduction="sum").item()
    got_sum = smooth_l1_loss(pred, target, beta, valid, normalizer=1)
    np.testing.assert_allclose(float(got_sum), want, rtol=RTOL)
    # detectron2's box-head normalisation: sum over positives / number of sampled RoIs.
    np.testing.assert_allclose(float(smooth_l1_loss(pred, target, beta, valid, normalizer=512)), want / 512,
                               rtol=RTOL)
    np.testing.assert_allclose(float(smooth_l1_loss(pred, target, beta, valid)), want / (4 * valid.sum()), rtol=RTOL)
    traced = jax.jit(lambda b: smooth_l1_loss(pred, target, b, valid, normalizer=1))(jnp.float32(beta))
    np.testing.assert_allclose(float(traced), want, rtol=RTOL)


def test_smooth_l1_beta_zero_is_exactly_l1(rng):
    pred = rng.normal(0, 1, (30, 4)).astype(np.float32)
    target = rng.normal(0, 1, (30, 4)).astype(np.float32)
    got = smooth_l1_loss(pred, target, 0.0, normalizer=1)
    assert float(got) == float(jnp.abs(jnp.asarray(pred) - jnp.asarray(target)).sum())


def _gather_channel(logits, classes):
    return np.take_along_axis(logits, classes[:, None, None, None], axis=-1)[..., 0]


def test_sigmoid_mask_loss_uses_only_the_gt_channel(rng):
    torch = pytest.importorskip("torch")
    logits = _logits(rng, (10, 14, 14, 5))  # labels 1..4 plus the unused background channel 0
    targets = (rng.uniform(size=(10, 14, 14)) < 0.4).astype(np.float32)
    classes = rng.integers(1, 5, 10)
    valid = np.arange(10) < 6
    selected = _gather_channel(logits, classes)
    want = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(selected[valid]),
                                                                torch.tensor(targets[valid])).item()
    got = sigmoid_mask_loss(logits, targets, classes, valid)
    np.testing.assert_allclose(float(got), want, rtol=RTOL)
    # Changing other channels, or invalid RoIs, changes nothing.
    perturbed = logits + rng.normal(0, 1, logits.shape).astype(np.float32) * (
        np.arange(5)[None, None, None, :] != classes[:, None, None, None])
    perturbed[~valid] = 0.0
    np.testing.assert_allclose(float(sigmoid_mask_loss(perturbed, targets, classes, valid)), want, rtol=RTOL)


def test_class_agnostic_mask_loss(rng):
    logits = _logits(rng, (6, 7, 7, 1))
    targets = rng.uniform(size=(6, 7, 7)).astype(np.float32)
    valid = np.array([True, False, True, True, False, True])
    classes = rng.integers(1, 80, 6)  # any class reads channel 0
    got = sigmoid_mask_loss(logits, targets, classes, valid)
    want = sigmoid_binary_cross_entropy(logits[valid, ..., 0], targets[valid])
    np.testing.assert_allclose(float(got), float(want), rtol=RTOL)


def test_softmax_mask_loss_matches_torch_cross_entropy(rng):
    torch = pytest.importorskip("torch")
    logits = _logits(rng, (8, 14, 14, 4), scale=2.0)
    targets = (rng.uniform(size=(8, 14, 14)) < 0.5).astype(np.float32)
    classes = rng.integers(1, 4, 8)
    valid = rng.uniform(size=8) < 0.7
    valid[0] = True
    # Binary targets make it ordinary per-pixel classification: the class inside the mask, background outside.
    pixel_labels = np.where(targets > 0.5, classes[:, None, None], 0)
    want = torch.nn.functional.cross_entropy(torch.tensor(logits[valid]).permute(0, 3, 1, 2),
                                             torch.tensor(pixel_labels[valid])).item()
    np.testing.assert_allclose(float(softmax_mask_loss(logits, targets, classes, valid)), want, rtol=RTOL)


def test_softmax_mask_loss_soft_targets_closed_form(rng):
    logits = _logits(rng, (3, 5, 5, 3), scale=2.0).astype(np.float64)
    targets = rng.uniform(size=(3, 5, 5))
    classes = np.array([2, 1, 2])
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -(targets * _gather_channel(log_p, classes) + (1 - targets) * log_p[..., 0]).mean()
    np.testing.assert_allclose(float(softmax_mask_loss(logits, targets, classes, np.ones(3, bool))), want,
                               rtol=RTOL)


def test_softmax_mask_loss_with_one_class_is_sigmoid_bce(rng):
    # Two channels (background, class 1): the softmax is a sigmoid of the logit difference.
    logits = _logits(rng, (4, 6, 6, 2))
    targets = rng.uniform(size=(4, 6, 6)).astype(np.float32)
    valid = np.array([True, True, False, True])
    softmax = softmax_mask_loss(logits, targets, np.ones(4, np.int32), valid)
    sigmoid = sigmoid_binary_cross_entropy(logits[..., 1] - logits[..., 0], targets, valid)
    np.testing.assert_allclose(float(softmax), float(sigmoid), rtol=RTOL)


def test_softmax_mask_probability_matches_torch_softmax(rng):
    torch = pytest.importorskip("torch")
    logits = _logits(rng, (2, 3, 7, 7, 5), scale=3.0)  # [B, D, m, m, K + 1]
    classes = rng.integers(1, 5, (2, 3))
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=-1).numpy()
    p_class = np.take_along_axis(p, classes[..., None, None, None], axis=-1)[..., 0]
    np.testing.assert_allclose(softmax_mask_probability(logits, classes, "class_probability"), p_class,
                               rtol=RTOL, atol=ATOL)
    versus_background = softmax_mask_probability(logits, classes, "versus_background")
    np.testing.assert_allclose(versus_background, p_class / (p_class + p[..., 0]), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(versus_background, softmax_mask_probability(logits, classes))  # the default
    # Other object classes do not enter class-versus-background, only p[c]'s share of all K + 1 outcomes.
    others = np.arange(5) != 0
    others = others & (np.arange(5) != classes[..., None, None, None])
    shifted = logits + 5.0 * others
    np.testing.assert_allclose(softmax_mask_probability(shifted, classes), versus_background, rtol=RTOL, atol=ATOL)
    assert np.all(np.asarray(softmax_mask_probability(shifted, classes, "class_probability")) < p_class)


def test_softmax_mask_probability_is_exact_where_class_and_background_are_both_unlikely():
    # Another class takes nearly all the mass: p[c] and p[0] are ~e^-100, their ratio still e^1 / (e^1 + 1).
    logits = np.zeros((1, 1, 1, 3), np.float32)
    logits[..., 1], logits[..., 2] = 1.0, 100.0
    got = softmax_mask_probability(logits, np.array([1]))
    np.testing.assert_allclose(got, [[[np.e / (np.e + 1)]]], rtol=RTOL)


def test_softmax_mask_probability_rejects_unknown_decodings():
    with pytest.raises(ValueError, match="versus_background"):
        softmax_mask_probability(np.zeros((1, 2, 2, 3), np.float32), np.array([1]), "argmax")


def _all_losses(logits_k, logits_2d, targets_2d, classes, deltas, valid_rois):
    """Every loss on one set of inputs, for the NaN-safety and gradient tests."""
    return {
        "bce": sigmoid_binary_cross_entropy(logits_2d[..., 0], targets_2d, valid_rois),
        "ce": softmax_cross_entropy(logits_k[:, 0, 0, :], classes, valid_rois),
        "smooth_l1": smooth_l1_loss(deltas, jnp.zeros_like(deltas), 1.0 / 9, valid_rois, normalizer=valid_rois.sum()),
        "l1": smooth_l1_loss(deltas, jnp.zeros_like(deltas), 0.0, valid_rois),
        "sigmoid_mask": sigmoid_mask_loss(logits_k, targets_2d, classes, valid_rois),
        "softmax_mask": softmax_mask_loss(logits_k, targets_2d, classes, valid_rois),
    }


def _inputs(rng, num_rois=5):
    logits_k = _logits(rng, (num_rois, 6, 6, 4), scale=2.0)
    logits_2d = _logits(rng, (num_rois, 6, 6, 1), scale=2.0)
    targets_2d = (rng.uniform(size=(num_rois, 6, 6)) < 0.5).astype(np.float32)
    classes = rng.integers(1, 4, num_rois).astype(np.int32)
    deltas = rng.normal(0, 0.3, (num_rois, 4)).astype(np.float32)
    return logits_k, logits_2d, targets_2d, classes, deltas


def test_all_invalid_gives_zero_loss_and_zero_gradients(rng):
    logits_k, logits_2d, targets_2d, classes, deltas = _inputs(rng)
    invalid = jnp.zeros(5, bool)

    def total(logits_k, logits_2d, deltas):
        return sum(_all_losses(logits_k, logits_2d, targets_2d, classes, deltas, invalid).values())

    values = jax.jit(lambda *a: _all_losses(*a, invalid))(logits_k, logits_2d, targets_2d, classes, deltas)
    for name, value in values.items():
        assert float(value) == 0.0, name
    grads = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(logits_k, logits_2d, deltas)
    for grad in grads:
        assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad).any()


def test_gradients_match_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    logits_k, logits_2d, targets_2d, classes, deltas = _inputs(rng)
    logits_2d[0, 0, 0, 0] = 0.0  # the kink of max(x, 0) and |x|
    deltas[1, 2] = 0.0
    valid = np.array([True, False, True, True, False])

    def total(logits_k, logits_2d, deltas):
        return sum(_all_losses(logits_k, logits_2d, targets_2d, classes, deltas, jnp.asarray(valid)).values())

    grads = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(logits_k, logits_2d, deltas)

    t_k = torch.tensor(logits_k, requires_grad=True)
    t_2d = torch.tensor(logits_2d, requires_grad=True)
    t_d = torch.tensor(deltas, requires_grad=True)
    t_targets = torch.tensor(targets_2d)
    t_classes = torch.tensor(classes, dtype=torch.long)
    v = torch.tensor(valid)
    count = int(valid.sum())
    bce = F.binary_cross_entropy_with_logits(t_2d[v][..., 0], t_targets[v])
    ce = F.cross_entropy(t_k[v][:, 0, 0, :], t_classes[v])
    smooth = F.smooth_l1_loss(t_d[v], torch.zeros_like(t_d[v]), beta=1.0 / 9, reduction="sum") / count
    l1 = F.l1_loss(t_d[v], torch.zeros_like(t_d[v]))
    selected = torch.gather(t_k, 3, t_classes[:, None, None, None].expand(-1, 6, 6, 1))[..., 0]
    sigmoid_mask = F.binary_cross_entropy_with_logits(selected[v], t_targets[v])
    pixel_labels = torch.where(t_targets > 0.5, t_classes[:, None, None], 0)
    softmax_mask = F.cross_entropy(t_k[v].permute(0, 3, 1, 2), pixel_labels[v])
    (bce + ce + smooth + l1 + sigmoid_mask + softmax_mask).backward()

    for got, want in zip(grads, (t_k.grad, t_2d.grad, t_d.grad)):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-4, atol=1e-6)


def test_gradient_matches_finite_differences(rng):
    logits_k, logits_2d, targets_2d, classes, deltas = _inputs(rng, num_rois=3)
    valid = jnp.array([True, True, False])
    targets_soft = rng.uniform(size=targets_2d.shape)

    def total(logits_k):
        return softmax_mask_loss(logits_k, targets_soft, classes, valid) + sigmoid_mask_loss(
            logits_k, targets_soft, classes, valid)

    x = logits_k.astype(np.float64)
    with jax.enable_x64(True):
        grad = np.asarray(jax.grad(total)(jnp.asarray(x)))
        direction = rng.normal(size=x.shape)
        eps = 1e-6
        numeric = (float(total(jnp.asarray(x + eps * direction))) - float(total(jnp.asarray(x - eps * direction)))) / (
            2 * eps)
    np.testing.assert_allclose((grad * direction).sum(), numeric, rtol=1e-5)


def test_bfloat16_inputs_are_reduced_in_float32(rng):
    logits = _logits(rng, (4, 6, 6, 3))
    targets = (rng.uniform(size=(4, 6, 6)) < 0.5).astype(np.float32)
    classes = np.array([1, 2, 1, 2])
    valid = np.ones(4, bool)
    low = sigmoid_mask_loss(jnp.asarray(logits, jnp.bfloat16), targets, classes, valid)
    assert low.dtype == jnp.float32
    exact = sigmoid_mask_loss(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), targets, classes, valid)
    np.testing.assert_allclose(float(low), float(exact), rtol=RTOL)
