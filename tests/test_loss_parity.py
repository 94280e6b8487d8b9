"""Our training losses against torchvision's, on one fixed batch: both sides get the same anchors, proposals, matched
ground truth and sampled indices, and the five losses agree to 1e-5 relative for box_loss_beta 0 and 1/9.

What torchvision is handed. Our matching and sampling run in pieces (ops.match_boxes, ops.sample_balanced with the
per-image keys rpn_losses and sample_rois split from theirs); torchvision gets the result and does the rest itself:
  * RPN: RegionProposalNetwork.compute_loss with our labels, its fg_bg_sampler replaced by one returning our sampled
    anchors, and regression targets from its own BoxCoder (weights 1, 1, 1, 1) on the matched GT boxes.
  * Box head: fastrcnn_loss on our sampled RoIs, their labels, and targets from its own BoxCoder (10, 10, 5, 5).
  * Mask head: maskrcnn_loss on our positive RoIs, their matched GT and its labels (see the mask tests below).
We additionally check that torchvision's RoIHeads.assign_targets_to_proposals gives every RoI we sampled the label we
gave it (crowd boxes, which torchvision does not know, are withheld from it).

Where torchvision's normalisation differs from detectron2's (which ours follows), the test computes both and asserts
the exact relation:
  * RPN, both losses: torchvision averages the BCE over the sampled anchors of the batch and divides the smooth-L1
    sum by their number, num_sampled; detectron2 divides both sums by num_images * batch_size_per_image. So
    ours * (B * batch_size_per_image) / num_sampled == torchvision's. They are equal when every image fills its
    sample; here a crowd-only image, whose crowd region ignores most anchors, cannot, so the factor is not 1.
  * Box head: no difference. Both average the cross-entropy over the sampled RoIs and divide the regression sum by
    the number of sampled RoIs (torchvision's labels.numel()).
  * Smooth-L1 beta: torchvision hardcodes beta=1/9 in compute_loss and fastrcnn_loss; detectron2's default is 0 (L1).
    At 1/9 torchvision runs as shipped; at 0 its F.smooth_l1_loss is wrapped to receive beta=0 (torch's smooth-L1 at
    beta 0 is exactly the L1 loss).
  * Mask: torchvision's targets are roi_align(full GT mask, RoI, 28, spatial_scale=1, sampling_ratio=-1,
    aligned=False), soft and read half a pixel off; ours are bilinear resamples of 0.5-binarised box crops
    (ops.mask_targets_from_cropped). The loss itself (BCE on the matched GT class's channel, averaged over positive
    RoIs and their 28 x 28 pixels) is the same. test_mask_loss_with_targets_equal_by_construction builds masks and
    RoIs on which both target rules give the same binary targets, and runs torchvision unmodified;
    test_mask_loss_on_shared_targets uses arbitrary masks and RoIs and hands torchvision our targets.

Measured (float32 on both sides, these seeds; each test prints its errors under -s), largest relative error over
beta 0 and 1/9: loss_objectness 1.5e-7, loss_rpn_box_reg 8.7e-8 (after the factor 3 * 96 / 269), loss_classifier
2.7e-7, loss_box_reg 1.8e-7, loss_mask 0 (bit-identical, on both mask tests).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from torchvision.models.detection import roi_heads as tv_roi_heads  # noqa: E402
from torchvision.models.detection._utils import BoxCoder  # noqa: E402
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_loss  # noqa: E402
from torchvision.models.detection.rpn import RegionProposalNetwork  # noqa: E402

from maskrcnn_jax import ops  # noqa: E402
from maskrcnn_jax.modeling.roi_heads import BOX_WEIGHTS, box_head_losses, sample_rois  # noqa: E402
from maskrcnn_jax.modeling.rpn import rpn_losses  # noqa: E402

RTOL = 1e-5
BETAS = [0.0, 1.0 / 9]
TORCHVISION_BETA = 1.0 / 9  # hardcoded in RegionProposalNetwork.compute_loss and fastrcnn_loss


# Jitted: one compile each is cheaper than dispatching the matching and sampling op by op.
jit_rpn_losses = jax.jit(rpn_losses, static_argnames=("iou_thresholds", "batch_size_per_image", "positive_fraction",
                                                      "box_loss_beta"))
jit_sample_rois = jax.jit(sample_rois, static_argnames=("batch_size_per_image", "positive_fraction"))
jit_match_boxes = jax.jit(ops.match_boxes, static_argnums=(4, 5, 6))
jit_sample_balanced = jax.jit(ops.sample_balanced, static_argnums=(2, 3))


def relative_error(ours, theirs):
    return abs(float(ours) - float(theirs)) / abs(float(theirs))


@pytest.fixture
def torchvision_beta(monkeypatch):
    """Makes torchvision's smooth-L1 calls use `beta` instead of their hardcoded 1/9 (a no-op for beta 1/9)."""

    def use(beta):
        if beta == TORCHVISION_BETA:
            return
        original = torch.nn.functional.smooth_l1_loss

        def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
            assert beta == TORCHVISION_BETA
            return original(input, target, reduction=reduction, beta=use.beta)

        use.beta = beta
        # torchvision's detection modules call it as F.smooth_l1_loss, looked up on torch.nn.functional at call time.
        monkeypatch.setattr(torch.nn.functional, "smooth_l1_loss", smooth_l1_loss)

    return use


def random_boxes(rng, n, size, min_wh, max_wh):
    wh = rng.uniform(min_wh, max_wh, (n, 2))
    xy = rng.uniform(0, size - wh)
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def jittered(rng, boxes, copies, scale):
    out = np.repeat(boxes, copies, axis=0)
    wh = np.tile(out[:, 2:] - out[:, :2], 2)
    out = out + (rng.normal(0, scale, out.shape) * wh).astype(np.float32)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 1.0)
    return out


def ground_truth(rng, size, num_slots=4, num_classes=6):
    """[3, G] padded: image 0 has three instances, image 1 none (random boxes in its invalid slots), image 2 one crowd
    region covering most of the image."""
    boxes = np.stack([random_boxes(rng, num_slots, size, 0.2 * size, 0.6 * size) for _ in range(3)])
    classes = rng.integers(1, num_classes, (3, num_slots)).astype(np.int32)
    valid = np.zeros((3, num_slots), bool)
    crowd = np.zeros((3, num_slots), bool)
    valid[0, :3] = True
    valid[2, 0] = crowd[2, 0] = True
    boxes[2, 0] = [1.0, 2.0, size - 1.0, size - 3.0]
    return boxes, classes, valid, crowd


# -- RPN ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
def test_rpn_losses_against_torchvision_compute_loss(rng, beta, torchvision_beta):
    size, batch_size_per_image, fraction = 64, 96, 0.5
    anchors = jnp.concatenate(ops.generate_anchors((size, size), (8, 16, 32), (16, 32, 64)))  # [252, 4]
    gt, _, valid, crowd = ground_truth(rng, size)
    num_anchors = anchors.shape[0]
    objectness = rng.normal(0, 3, (3, num_anchors)).astype(np.float32)
    deltas = rng.normal(0, 0.5, (3, num_anchors, 4)).astype(np.float32)
    key = jax.random.key(int(rng.integers(1 << 30)))

    ours = jit_rpn_losses(key, objectness, deltas, anchors, gt, valid, crowd, iou_thresholds=(0.3, 0.7),
                          batch_size_per_image=batch_size_per_image, positive_fraction=fraction, box_loss_beta=beta)

    # The same matching and sample, in pieces: image b uses the b-th split of the key, as rpn_losses does.
    keys = jax.random.split(key, 3)
    labels, targets, positive_masks, negative_masks = [], [], [], []
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    anchors_t = torch.tensor(np.asarray(anchors))
    for b in range(3):
        matched, label = map(np.asarray, jit_match_boxes(gt[b], valid[b], crowd[b], anchors, 0.3, 0.7, True))
        index, sampled, positive = map(np.asarray, jit_sample_balanced(keys[b], label, batch_size_per_image,
                                                                       fraction))
        positive_mask = np.zeros(num_anchors, bool)
        negative_mask = np.zeros(num_anchors, bool)
        positive_mask[index[sampled & positive]] = True
        negative_mask[index[sampled & ~positive]] = True
        positive_masks.append(torch.tensor(positive_mask))
        negative_masks.append(torch.tensor(negative_mask))
        labels.append(torch.tensor(label, dtype=torch.float32))
        # Only positives' targets are read; the others encode the anchor itself (never padding's zero boxes).
        matched_boxes = np.where((label == 1)[:, None], gt[b][matched], np.asarray(anchors))
        targets.append(coder.encode_single(torch.tensor(matched_boxes), anchors_t))
    num_sampled = int(sum(int(p.sum() + n.sum()) for p, n in zip(positive_masks, negative_masks)))
    assert num_sampled < 3 * batch_size_per_image  # the crowd-only image cannot fill its sample
    assert int(positive_masks[0].sum()) >= 3 and not positive_masks[1].any() and not positive_masks[2].any()

    rpn = RegionProposalNetwork(None, None, 0.7, 0.3, batch_size_per_image, fraction, {"training": 1, "testing": 1},
                                {"training": 1, "testing": 1}, 0.7)
    rpn.fg_bg_sampler = lambda _: (positive_masks, negative_masks)
    torchvision_beta(beta)
    theirs_cls, theirs_box = rpn.compute_loss(torch.tensor(objectness.reshape(-1, 1)),
                                              torch.tensor(deltas.reshape(-1, 4)), labels, targets)

    factor = 3 * batch_size_per_image / num_sampled
    errors = {"loss_objectness": relative_error(float(ours["rpn_cls"]) * factor, theirs_cls),
              "loss_rpn_box_reg": relative_error(float(ours["rpn_box"]) * factor, theirs_box)}
    print(f"\nRPN beta={beta:.4f}: ours x (B * {batch_size_per_image}) / {num_sampled} vs torchvision, relative "
          f"errors {errors}")
    np.testing.assert_allclose(float(ours["rpn_cls"]) * factor, theirs_cls.item(), rtol=RTOL)
    np.testing.assert_allclose(float(ours["rpn_box"]) * factor, theirs_box.item(), rtol=RTOL)
    assert theirs_box.item() > 0


# -- box head -----------------------------------------------------------------------------------------------------


def roi_scene(rng, size=96.0, num_proposals=40):
    gt, classes, valid, crowd = ground_truth(rng, size)
    proposals = []
    for b in range(3):
        p = np.concatenate([jittered(rng, gt[b][valid[b]], 8, 0.1), random_boxes(rng, num_proposals, size, 8, 60)])
        proposals.append(p[:num_proposals][rng.permutation(num_proposals)])
    proposal_valid = rng.uniform(size=(3, num_proposals)) < 0.9
    return np.stack(proposals), proposal_valid, gt, classes, valid, crowd


def torchvision_roi_heads(batch_size_per_image, fraction):
    return RoIHeads(None, None, None, 0.5, 0.5, batch_size_per_image, fraction, BOX_WEIGHTS, 0.05, 0.5, 100)


@pytest.mark.parametrize("beta", BETAS)
def test_box_head_losses_against_torchvision_fastrcnn_loss(rng, beta, torchvision_beta):
    batch_size_per_image, fraction, num_classes = 32, 0.25, 6
    proposals, proposal_valid, gt, classes, valid, crowd = roi_scene(rng)
    key = jax.random.key(int(rng.integers(1 << 30)))
    sampled = jit_sample_rois(key, proposals, proposal_valid, gt, classes, valid, crowd,
                              batch_size_per_image=batch_size_per_image, positive_fraction=fraction)
    class_logits = rng.normal(0, 2, (3, batch_size_per_image, num_classes)).astype(np.float32)
    box_deltas = rng.normal(0, 0.5, (3, batch_size_per_image, num_classes, 4)).astype(np.float32)
    ours = box_head_losses(class_logits, box_deltas, sampled, gt, box_loss_beta=beta)

    s = {name: np.asarray(value) for name, value in sampled.items()}
    heads = torchvision_roi_heads(batch_size_per_image, fraction)
    labels, targets, logits, regression = [], [], [], []
    for b in range(3):
        v = s["valid"][b]
        rois = s["rois"][b][v]
        matched_boxes = np.where(s["positive"][b][v][:, None], gt[b][s["matched_gt"][b][v]], rois)
        labels.append(torch.tensor(s["classes"][b][v], dtype=torch.int64))
        targets.append(heads.box_coder.encode_single(torch.tensor(matched_boxes), torch.tensor(rois)))
        logits.append(torch.tensor(class_logits[b][v]))
        regression.append(torch.tensor(box_deltas[b][v].reshape(-1, num_classes * 4)))
        # torchvision's own assignment (GT appended, IoU 0.5, crowd withheld) labels our sampled RoIs as we did.
        usable = valid[b] & ~crowd[b]
        _, their_labels = heads.assign_targets_to_proposals([torch.tensor(rois)], [torch.tensor(gt[b][usable])],
                                                            [torch.tensor(classes[b][usable], dtype=torch.int64)])
        np.testing.assert_array_equal(their_labels[0].numpy(), s["classes"][b][v])
    assert s["positive"].sum() >= 6 and s["valid"][1].all()  # the empty image fills its sample with negatives

    torchvision_beta(beta)
    theirs_cls, theirs_box = fastrcnn_loss(torch.cat(logits), torch.cat(regression), labels, targets)
    errors = {"loss_classifier": relative_error(ours["box_cls"], theirs_cls),
              "loss_box_reg": relative_error(ours["box_reg"], theirs_box)}
    print(f"\nbox head beta={beta:.4f}: relative errors {errors}")
    np.testing.assert_allclose(float(ours["box_cls"]), theirs_cls.item(), rtol=RTOL)
    np.testing.assert_allclose(float(ours["box_reg"]), theirs_box.item(), rtol=RTOL)


# -- mask head ----------------------------------------------------------------------------------------------------


@jax.jit
def our_mask_loss(mask_logits, sampled, gt_crops, gt_boxes):
    """The model's assembly (MaskRCNN._positive_roi_losses_on_prefix): targets from the matched GT's crop, the sigmoid loss on
    the class channel. mask_logits [B, S, 28, 28, C]; sampled as sample_rois returns it, [B, S, ...].
    Returns the loss and the targets."""
    targets = jax.vmap(ops.mask_targets_from_cropped, in_axes=(0, 0, 0, 0, None))(
        gt_crops, gt_boxes, sampled["rois"], sampled["matched_gt"], 28)
    flat = lambda x: jnp.reshape(x, (-1, *jnp.shape(x)[2:]))
    loss = ops.sigmoid_mask_loss(flat(mask_logits), flat(targets), flat(sampled["classes"]), flat(sampled["positive"]))
    return loss, targets


def torchvision_mask_inputs(mask_logits, sampled, gt_classes):
    """maskrcnn_loss's arguments for our positive RoIs: NCHW logits, and per image the RoIs, labels, matched GT."""
    s = {name: np.asarray(value) for name, value in sampled.items()}
    logits, proposals, labels, matched = [], [], [], []
    for b in range(s["positive"].shape[0]):
        p = s["positive"][b]
        logits.append(np.moveaxis(mask_logits[b][p], -1, 1))
        proposals.append(torch.tensor(s["rois"][b][p]))
        labels.append(torch.tensor(gt_classes[b], dtype=torch.int64))
        matched.append(torch.tensor(s["matched_gt"][b][p], dtype=torch.int64))
    return torch.tensor(np.concatenate(logits)), proposals, labels, matched


def test_mask_loss_with_targets_equal_by_construction(rng):
    """Masks and RoIs on which torchvision's roi_align targets and ours are the same binary arrays, so that
    torchvision's maskrcnn_loss runs unmodified.

    Construction, per axis (y alike): every full GT mask is constant on the pixel blocks 4q+1 .. 4q+4 (a random
    pattern of blocks); GT boxes are 128 px wide with x1 = 4a + 1 (block edges), cropped at M = 128, so that a crop
    cell is a pixel and the crop holds exactly the pixel values; the mask is 0 outside its box. RoIs are 112 px wide
    with x1 = 4q + 0.5, so a 28-bin has 4 px:
      * torchvision (aligned=False, sampling_ratio = ceil(112 / 28) = 4) samples bin j at pixel indices
        x1 + 4j + k + 0.5 = 4(q + j) + 1 + k, k = 0..3: the four pixels of one block, read exactly (integer
        positions), so its target is that block's value;
      * ours samples bin j at x1 + 4j + 1 and + 3 (continuous), the centres of pixels 4(q + j) + 1 and + 3 of the
        same block, and reads the crop there exactly, so its target is the same value.
    RoIs partly outside their GT box read 0 there on both sides. The logits and the per-image bookkeeping are
    arbitrary; an empty image (no positive RoI) is part of the batch.
    """
    size, crop, num_classes = 192, 128, 5
    blocks = size // 4 + 1
    gt_boxes = np.zeros((3, 2, 4), np.float32)
    full_masks = np.zeros((3, 2, size, size), np.float32)
    index = np.arange(size)
    rois, matched = [], []
    for b in (0, 2):  # image 1 is empty: its slots stay invalid and no RoI is positive
        for g in range(2):
            ax, ay = rng.integers(0, 16, 2)
            x1, y1 = 4 * ax + 1, 4 * ay + 1
            gt_boxes[b, g] = [x1, y1, x1 + 128, y1 + 128]
            pattern = rng.uniform(size=(blocks, blocks)) < 0.5
            mask = pattern[(index[:, None] - 1) // 4 + 1, (index[None, :] - 1) // 4 + 1]
            in_box = ((index >= y1) & (index < y1 + 128))[:, None] & ((index >= x1) & (index < x1 + 128))[None, :]
            full_masks[b, g] = mask & in_box
        num = 5
        matched.append(rng.integers(0, 2, num))
        q = np.clip((gt_boxes[b, matched[-1], :2] - 1) // 4 + rng.integers(-2, 7, (num, 2)), 0, (size - 113) // 4)
        rois.append(np.concatenate([4 * q + 0.5, 4 * q + 0.5 + 112], axis=1).astype(np.float32))
    slots = 6
    sampled = {"rois": np.zeros((3, slots, 4), np.float32), "matched_gt": np.zeros((3, slots), np.int32),
               "positive": np.zeros((3, slots), bool), "classes": np.zeros((3, slots), np.int32)}
    gt_classes = rng.integers(1, num_classes, (3, 2)).astype(np.int32)
    for b, r, m in zip((0, 2), rois, matched):
        sampled["rois"][b, :5], sampled["matched_gt"][b, :5], sampled["positive"][b, :5] = r, m, True
        sampled["classes"][b, :5] = gt_classes[b, m]
    sampled["rois"][:, 5] = random_boxes(rng, 3, size, 20, 100)  # padding: never read
    sampled["rois"][1] = random_boxes(rng, slots, size, 20, 100)
    for b, r, m in zip((0, 2), rois, matched):  # positives, realistically
        assert (np.asarray(ops.box_iou(r, gt_boxes[b]))[np.arange(5), m] >= 0.5).all()

    gt_crops = np.asarray(jax.vmap(lambda m, bx: ops.crop_masks_to_boxes(m, bx, crop))(full_masks, gt_boxes))
    assert set(np.unique(gt_crops)) <= {0.0, 1.0}
    mask_logits = rng.normal(0, 2, (3, slots, 28, 28, num_classes)).astype(np.float32)
    ours, our_targets = our_mask_loss(mask_logits, sampled, gt_crops, gt_boxes)
    our_targets = np.asarray(our_targets)

    logits, proposals, labels, their_matched = torchvision_mask_inputs(mask_logits, sampled, gt_classes)
    for b in (0, 2):
        their_targets = tv_roi_heads.project_masks_on_boxes(torch.tensor(full_masks[b]), proposals[b],
                                                           their_matched[b], 28).numpy()
        np.testing.assert_array_equal(our_targets[b, :5], their_targets)
        assert 0.2 < their_targets.mean() < 0.8  # non-trivial targets: both values, edges inside the RoIs
    theirs = maskrcnn_loss(logits, proposals, [torch.tensor(m) for m in full_masks], labels, their_matched)
    print(f"\nmask (targets equal by construction): {float(ours)} vs {theirs.item()}, relative error "
          f"{relative_error(ours, theirs)}")
    np.testing.assert_allclose(float(ours), theirs.item(), rtol=RTOL)


def test_mask_loss_on_shared_targets(rng, monkeypatch):
    """Arbitrary GT crops and sampled RoIs; torchvision's project_masks_on_boxes (the target rule) is replaced by
    ours, so maskrcnn_loss is checked on everything else: the matched GT's label picks the channel, and the BCE is
    averaged over all positive RoIs of the batch and their 28 x 28 pixels (padding and negatives carry no loss)."""
    proposals_, proposal_valid, gt, classes, valid, crowd = roi_scene(rng)
    num_classes, crop = 6, 14
    key = jax.random.key(int(rng.integers(1 << 30)))
    sampled = jit_sample_rois(key, proposals_, proposal_valid, gt, classes, valid, crowd, batch_size_per_image=32,
                              positive_fraction=0.25)
    prefix = 8  # the model runs the mask head on the first int(32 * 0.25) slots, which hold every positive
    sampled = {name: np.asarray(value)[:, :prefix] for name, value in sampled.items()}
    gt_crops = (rng.uniform(size=(3, gt.shape[1], crop, crop)) < 0.5).astype(np.float32)
    mask_logits = rng.normal(0, 2, (3, prefix, 28, 28, num_classes)).astype(np.float32)
    ours, _ = our_mask_loss(mask_logits, sampled, gt_crops, gt)

    def our_target_rule(image, boxes, matched, size):
        return torch.tensor(np.asarray(ops.mask_targets_from_cropped(gt_crops[image], gt[image], boxes.numpy(),
                                                                     matched.numpy(), size)))

    monkeypatch.setattr(tv_roi_heads, "project_masks_on_boxes", our_target_rule)
    logits, proposals, labels, matched = torchvision_mask_inputs(mask_logits, sampled, classes)
    # maskrcnn_loss hands each image's "gt_masks" entry to project_masks_on_boxes: here, the image's index.
    theirs = maskrcnn_loss(logits, proposals, [0, 1, 2], labels, matched)
    assert sampled["positive"][0].sum() >= 4 and not sampled["positive"][1:].any()
    print(f"\nmask (shared targets): {float(ours)} vs {theirs.item()}, relative error {relative_error(ours, theirs)}")
    np.testing.assert_allclose(float(ours), theirs.item(), rtol=RTOL)
