"""Masked, NaN-safe losses for Mask R-CNN training.

Every loss takes a `valid` mask (broadcast over the loss's trailing axes: a [R] mask covers [R, 4] box deltas) and
reduces as  sum(loss over valid elements) / max(normalizer, 1).  With normalizer=None it is the number of valid
elements, i.e. the mean over valid elements; pass an explicit count for detectron2's other normalisations:

- RPN (both losses): normalizer = num_images * batch_size_per_image, the number of sampled anchors;
- box head regression: normalizer = the number of sampled RoIs (classification is the plain mean);
- normalizer=1 gives the plain sum.

No input makes them divide by zero, and invalid entries never leak NaN or Inf into values or gradients.
"""

import jax
import jax.numpy as jnp


def _as_float(x):
    """At least float32: bfloat16 activations are upcast, float64 (tests under x64) is kept."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _reduce(loss, valid, normalizer):
    if valid is None:
        valid = jnp.ones(loss.shape, bool)
    else:
        valid = jnp.asarray(valid, bool)
        valid = jnp.broadcast_to(valid.reshape(valid.shape + (1,) * (loss.ndim - valid.ndim)), loss.shape)
    total = jnp.where(valid, loss, 0.0).sum()
    if normalizer is None:
        normalizer = valid.sum()
    return total / jnp.maximum(_as_float(normalizer), 1.0)


def _binary_cross_entropy_elementwise(logits, targets):
    # max(x, 0) - x t + log(1 + exp(-|x|)): exact for large |x|, the form of torch's BCE-with-logits kernel. max and
    # |.| are spelled as one select so that the gradient at x = 0 is sigmoid(0) - t, not a subgradient mix.
    nonnegative = logits >= 0
    relu = jnp.where(nonnegative, logits, 0.0)
    magnitude = jnp.where(nonnegative, logits, -logits)
    return relu - logits * targets + jnp.log1p(jnp.exp(-magnitude))


def sigmoid_binary_cross_entropy(logits, targets, valid=None, normalizer=None):
    """Binary cross-entropy with logits (torch's binary_cross_entropy_with_logits), targets in [0, 1]."""
    logits = _as_float(logits)
    targets = _as_float(targets)
    return _reduce(_binary_cross_entropy_elementwise(logits, targets), valid, normalizer)


def softmax_cross_entropy(logits, labels, valid=None, normalizer=None):
    """Multinomial cross-entropy: logits [..., C], integer labels [...] in [0, C) (torch's cross_entropy).

    Labels of invalid entries may be anything (they are clipped into range and then masked).
    """
    logits = _as_float(logits)
    labels = jnp.clip(jnp.asarray(labels, jnp.int32), 0, logits.shape[-1] - 1)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    return _reduce(loss, valid, normalizer)


def smooth_l1_loss(pred, target, beta, valid=None, normalizer=None):
    """detectron2's smooth_l1_loss: 0.5 x^2 / beta where |x| < beta, else |x| - 0.5 beta; x = pred - target.

    beta < 1e-5 (in particular 0, detectron2's default) is exactly the L1 loss |x|. Agrees with torch's
    F.smooth_l1_loss(pred, target, beta=beta) elementwise. `beta` may be a Python number or a traced scalar.
    """
    diff = _as_float(pred) - _as_float(target)
    abs_diff = jnp.abs(diff)
    if isinstance(beta, (int, float)):
        if beta < 1e-5:
            return _reduce(abs_diff, valid, normalizer)
        loss = jnp.where(abs_diff < beta, 0.5 * diff * diff / beta, abs_diff - 0.5 * beta)
    else:
        beta = _as_float(beta)
        safe_beta = jnp.maximum(beta, 1e-5)
        quadratic = jnp.where(abs_diff < beta, 0.5 * diff * diff / safe_beta, abs_diff - 0.5 * beta)
        loss = jnp.where(beta < 1e-5, abs_diff, quadratic)
    return _reduce(loss, valid, normalizer)


def _mask_normalizer(targets, valid):
    """Number of valid RoIs times pixels per mask: the loss is a mean over valid RoIs and their pixels."""
    pixels_per_mask = targets.shape[-1] * targets.shape[-2]
    return jnp.asarray(valid, bool).sum() * pixels_per_mask


def sigmoid_mask_loss(mask_logits, targets, gt_classes, valid):
    """Mask R-CNN's mask loss: per-pixel sigmoid BCE on the ground-truth class's channel only.

    Args:
      mask_logits: [R, m, m, C] NHWC mask-head output. Channel c is the mask of class label c, so a class-specific
        head has C = K + 1 channels for labels 1..K (channel 0, background, is unused by this loss and kept so
        that channels and labels share one index, like the box classifier). C = 1 is the class-agnostic head:
        channel 0 serves every class.
      targets: [R, m, m] in [0, 1] (binarised mask targets, or soft ones).
      gt_classes: [R] int labels 1..K of the RoIs' matched ground truth (ignored when C = 1).
      valid: [R] bool, the foreground RoIs that carry a mask target.

    Returns the BCE averaged over valid RoIs and all their m x m pixels (0 when none is valid).
    """
    mask_logits = _as_float(mask_logits)
    if mask_logits.shape[-1] == 1:
        selected = mask_logits[..., 0]
    else:
        channel = jnp.clip(jnp.asarray(gt_classes, jnp.int32), 0, mask_logits.shape[-1] - 1)
        selected = jnp.take_along_axis(mask_logits, channel[:, None, None, None], axis=-1)[..., 0]
    return sigmoid_binary_cross_entropy(selected, targets, valid, _mask_normalizer(targets, valid))


def softmax_mask_loss(mask_logits, targets, gt_classes, valid):
    """The paper's multinomial ablation: per-pixel softmax over classes, so class masks compete.

    Args as sigmoid_mask_loss, with C = K + 1 >= 2 channels: channel 0 is background, channel c the class-c mask.

    Definition: at every pixel of a valid RoI take softmax over all K + 1 channels; the target distribution puts
    weight t on the RoI's class and 1 - t on background (t is the mask target, so a binary target makes it the
    ordinary pixel label: gt class inside the mask, background outside). The loss is the cross-entropy
    -(t log p[class] + (1 - t) log p[0]) averaged over valid RoIs and pixels.

    Why a background channel: with a softmax over the K object channels alone, pixels outside the object would have
    no class to be assigned to, and the loss could not teach the mask's shape. Semantic segmentation's multinomial
    loss, the coupling the paper contrasts with its per-class sigmoids, has exactly this K + 1-way form. At
    inference, softmax_mask_probability turns the logits into the class-c mask.
    """
    mask_logits = _as_float(mask_logits)
    num_channels = mask_logits.shape[-1]
    if num_channels < 2:
        raise ValueError(f"softmax_mask_loss needs a background channel plus class channels, got {num_channels}")
    targets = _as_float(targets)
    log_probs = jax.nn.log_softmax(mask_logits, axis=-1)
    channel = jnp.clip(jnp.asarray(gt_classes, jnp.int32), 1, num_channels - 1)
    log_p_class = jnp.take_along_axis(log_probs, channel[:, None, None, None], axis=-1)[..., 0]
    log_p_background = log_probs[..., 0]
    loss = -(targets * log_p_class + (1.0 - targets) * log_p_background)
    return _reduce(loss, valid, _mask_normalizer(targets, valid))


# How a K + 1-way softmax mask becomes the detected class's mask, which is pasted and cut at 0.5 like a sigmoid's.
SOFTMAX_MASK_DECODINGS = ("versus_background", "class_probability")


def softmax_mask_probability(mask_logits, classes, decoding="versus_background"):
    """The class-`classes` mask of softmax_mask_loss's logits: [..., m, m, C] and [...] labels -> [..., m, m].

    versus_background: p[c] / (p[c] + p[0]), class c against background at each pixel, so the 0.5 cut keeps the
      pixels where c beats background. Which class the object is stays the box classifier's decision, as for the
      sigmoid masks: early in training the mask head is sure of background outside an object before it tells the
      classes apart inside it, where p[c] then sits near 1 / (K + 1), so cutting p[c] itself at 0.5 leaves empty
      masks (the ablation suite's softmax run at 300 steps: mask AP 0.0 that way, 9.0 with this decoding, box
      AP 16.9 both; experiments/RESULTS.md).
    class_probability: p[c] itself, the class's share of all K + 1 outcomes.
    """
    if decoding not in SOFTMAX_MASK_DECODINGS:
        raise ValueError(f"softmax mask decoding must be one of {SOFTMAX_MASK_DECODINGS}, got {decoding!r}")
    log_probs = jax.nn.log_softmax(_as_float(mask_logits), axis=-1)
    channel = jnp.asarray(classes, jnp.int32)[..., None, None, None]
    log_p_class = jnp.take_along_axis(log_probs, channel, axis=-1)[..., 0]
    if decoding == "class_probability":
        return jnp.exp(log_p_class)
    # p[c] / (p[c] + p[0]) = sigmoid(log p[c] - log p[0]): exact where both are tiny.
    return jax.nn.sigmoid(log_p_class - log_probs[..., 0])
