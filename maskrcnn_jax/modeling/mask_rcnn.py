"""The MaskRCNN module: backbone, RPN, box head and mask head wired together, with static shapes throughout.

Two entry points, both jit-able with one compile per input shape:
  * `MaskRCNN.losses(batch, key)`: the training forward pass, returning (total loss, named losses).
  * `MaskRCNN.predict(images, image_sizes)`: fixed-size detections with mask_size x mask_size mask probabilities.
`config` is the `model` section of a config (see modeling/defaults.py), frozen so the module stays hashable.

The backbones of the paper's Table 2 (`backbone.kind`), each with its heads (Figure 4):
  * "fpn": ResNet-FPN, RPN on P2-P6, RoI pooling on P2-P5, two-FC box head, 4-conv mask head, 28 x 28 masks.
  * "c4": ResNet up to C4, RPN and RoI pooling (14 x 14) on C4, res5 on the RoIs shared by a global-average box head
    and the mask head (transposed conv to 14 x 14 masks).
  * "c5": the whole ResNet, RPN and RoI pooling on C5 (stride 32), with the FPN-style heads on that one level.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from maskrcnn_jax import ops
from maskrcnn_jax.ops.roi_align import ROI_REDUCTIONS
from maskrcnn_jax.modeling.fpn import ResNetFPN
from maskrcnn_jax.modeling.heads import BoxHead, FCNMaskHead, GlobalPoolBoxHead, MLPMaskHead
from maskrcnn_jax.modeling.keypoint_head import KeypointHead
from maskrcnn_jax.modeling.res5_head import Res5Head
from maskrcnn_jax.modeling.roi_heads import box_head_losses, detect, sample_rois
from maskrcnn_jax.modeling.rpn import RPNHead, anchors_per_location, level_anchors, propose, rpn_losses
from maskrcnn_jax.modeling.single_level import SingleLevelResNet, single_level_stride

BACKBONE_KINDS = ("fpn", "c4", "c5")
# RoI feature extraction (the paper's Table 2c): RoIAlign, RoIPool, RoIWarp; align and warp average (or take the
# max of) their bilinear samples (ROI_REDUCTIONS), RoIPool is a max over quantized bins by definition.
ROI_OPS = ("align", "pool", "warp")
# "visible": detectron2's default (sum over the visible keypoints inside positive RoIs divided by their count in
# the batch), which equals torchvision's mean; "fixed": detectron2's NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS=False,
# divided by num_images * batch_size_per_image * positive_fraction * K (use it with loss_weight 4).
KEYPOINT_LOSS_NORMALIZATIONS = ("visible", "fixed")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class MaskRCNN(nn.Module):
    config: Any  # ml_collections.FrozenConfigDict of modeling.defaults.model_config()

    def setup(self):
        c = self.config
        self._check_roi_extraction()
        self._check_backbone_levels()
        if c.roi_heads.mask_loss not in ("sigmoid", "softmax"):
            raise ValueError(f"roi_heads.mask_loss must be 'sigmoid' or 'softmax', got {c.roi_heads.mask_loss!r}")
        if c.roi_heads.mask_loss == "softmax" and c.roi_heads.class_agnostic_mask:
            raise ValueError("a softmax mask loss needs one mask per class; it cannot be class-agnostic")
        if c.roi_heads.softmax_mask_decoding not in ops.SOFTMAX_MASK_DECODINGS:
            raise ValueError(f"roi_heads.softmax_mask_decoding must be one of {ops.SOFTMAX_MASK_DECODINGS}, "
                             f"got {c.roi_heads.softmax_mask_decoding!r}")
        dtype = DTYPES[c.dtype]
        b = c.backbone
        resnet = dict(depth=b.depth, norm=b.norm, stride_in_1x1=b.stride_in_1x1, groups=b.groups,
                      width_per_group=b.width_per_group, dtype=dtype)
        if b.kind == "fpn":
            self.backbone = ResNetFPN(freeze_at=b.freeze_at, fpn_channels=b.fpn_channels, **resnet)
        else:
            self.backbone = SingleLevelResNet(kind=b.kind, freeze_at=b.freeze_at, **resnet)
        a = c.anchors
        self.rpn_head = RPNHead(num_anchors=anchors_per_location(a.strides, a.sizes, a.aspect_ratios), dtype=dtype)
        if b.kind == "c4":
            self.res5 = Res5Head(**resnet)
            self.box_head = GlobalPoolBoxHead(num_classes=c.num_classes, dtype=dtype)
        else:
            self.box_head = BoxHead(num_classes=c.num_classes, fc_dim=c.roi_heads.fc_dim, dtype=dtype)
        if c.keypoint_on:
            k = c.keypoint_head
            if k.loss_normalization not in KEYPOINT_LOSS_NORMALIZATIONS:
                raise ValueError(f"keypoint_head.loss_normalization must be one of {KEYPOINT_LOSS_NORMALIZATIONS}, "
                                 f"got {k.loss_normalization!r}")
            self.keypoint_head = KeypointHead(num_keypoints=k.num_keypoints, conv_dim=k.conv_dim,
                                              num_convs=k.num_convs, dtype=dtype)
        if not c.mask_on:
            return
        num_masks = 1 if c.roi_heads.class_agnostic_mask else c.num_classes
        if c.roi_heads.mask_head == "fcn":
            self.mask_head = FCNMaskHead(
                num_masks=num_masks,
                conv_dim=c.roi_heads.mask_conv_dim,
                num_convs=c.roi_heads.mask_num_convs,
                dtype=dtype,
            )
        elif c.roi_heads.mask_head == "mlp":
            self.mask_head = MLPMaskHead(num_masks=num_masks, fc_dim=c.roi_heads.fc_dim, mask_size=self.mask_size,
                                         dtype=dtype)
        else:
            raise ValueError(f"roi_heads.mask_head must be 'fcn' or 'mlp', got {c.roi_heads.mask_head!r}")

    def _check_roi_extraction(self):
        r = self.config.roi_heads
        if r.roi_op not in ROI_OPS:
            raise ValueError(f"roi_heads.roi_op must be one of {ROI_OPS}, got {r.roi_op!r}")
        if r.roi_op == "pool" and r.roi_reduce is not None:
            raise ValueError(f"roi_heads.roi_reduce applies to 'align' and 'warp'; RoIPool is a max over quantized "
                             f"bins by definition (leave roi_reduce unset), got {r.roi_reduce!r}")
        if r.roi_reduce not in (None, *ROI_REDUCTIONS):
            raise ValueError(f"roi_heads.roi_reduce must be one of {ROI_REDUCTIONS}, got {r.roi_reduce!r}")

    def _check_backbone_levels(self):
        c = self.config
        kind = c.backbone.kind
        if kind not in BACKBONE_KINDS:
            raise ValueError(f"backbone.kind must be one of {BACKBONE_KINDS}, got {kind!r}")
        if kind == "fpn":
            return
        stride = single_level_stride(kind)
        if tuple(c.anchors.strides) != (stride,) or tuple(c.roi_heads.pool_strides) != (stride,):
            raise ValueError(f"backbone.kind {kind!r} has one level at stride {stride}: anchors.strides and "
                             f"roi_heads.pool_strides must be ({stride},), got {tuple(c.anchors.strides)} and "
                             f"{tuple(c.roi_heads.pool_strides)}")

    @property
    def mask_size(self) -> int:
        """The side of the predicted masks and of the mask targets (28 on FPN and C5, 14 on C4)."""
        return mask_size(self.config)

    # -- shared pieces ---------------------------------------------------------------------------------------

    def _features(self, images, train):
        """The levels the RPN reads: P2-P6 (as many as anchors.strides), or the one C4 or C5 map."""
        features = self.backbone(images, train=train)
        if self.config.backbone.kind != "fpn":
            return [features[self.config.backbone.kind]]
        return [features[f"p{level}"] for level in range(2, 2 + len(self.config.anchors.strides))]

    def _anchors(self, images):
        a = self.config.anchors
        return level_anchors(images.shape[1:3], a.strides, a.sizes, a.aspect_ratios)

    def _pooled_levels(self, levels):
        """The levels RoI pooling reads (P2-P5, or the one C4 or C5 map), flattened once so that the box and mask
        heads share one copy. In float32 whatever the compute dtype: RoI pooling gathers and accumulates in float32,
        as torch's autocast runs roi_align."""
        r = self.config.roi_heads
        pooled = [level.astype(jnp.float32) for level in levels[: len(r.pool_strides)]]
        return ops.flatten_pyramid(pooled, r.pool_strides)

    def _pool(self, pyramid, boxes, output_size):
        """roi_heads.roi_op on each box's level (a single-level pyramid puts every box on its one level)."""
        r = self.config.roi_heads
        reduce = r.roi_reduce or "avg"
        if r.roi_op == "align":
            out = ops.multilevel_roi_align(pyramid, boxes, output_size, r.pool_strides, r.sampling_ratio, r.aligned,
                                           roi_reduce=reduce)
        elif r.roi_op == "warp":
            out = ops.multilevel_roi_warp(pyramid, boxes, output_size, r.pool_strides, r.sampling_ratio,
                                          roi_reduce=reduce)
        else:
            out = ops.multilevel_roi_pool(pyramid, boxes, output_size, r.pool_strides)
        return out.astype(DTYPES[self.config.dtype])

    def _box_features(self, pyramid, rois, train):
        """The box head's input: RoI features at box_pool_size, and on C4 res5 on them (the mask head reads those
        too)."""
        pooled = self._pool(pyramid, rois, self.config.roi_heads.box_pool_size)
        if self.config.backbone.kind == "c4":
            return self.res5(pooled, train=train)
        return pooled

    def _mask_features(self, pyramid, rois, train):
        """The mask head's input for `rois`: RoI features at mask_pool_size, or on C4 res5 on the box pooling."""
        if self.config.backbone.kind == "c4":
            return self._box_features(pyramid, rois, train)
        return self._pool(pyramid, rois, self.config.roi_heads.mask_pool_size)

    def _proposals(self, levels, images, image_sizes, train):
        r = self.config.rpn
        objectness, deltas = self.rpn_head(levels)
        boxes, _, valid = propose(
            objectness,
            deltas,
            self._anchors(images),
            image_sizes,
            pre_nms_topk=r.pre_nms_topk_train if train else r.pre_nms_topk_test,
            post_nms_topk=r.post_nms_topk_train if train else r.post_nms_topk_test,
            nms_threshold=r.nms_threshold,
            min_size=r.min_size,
        )
        return objectness, deltas, boxes, valid

    def _crowd_ioa_threshold(self):
        """None when crowd regions are dropped, else the inside-a-crowd IoA above which candidates are ignored."""
        c = self.config
        if c.crowd_regions not in ("ignore", "drop"):
            raise ValueError(f"model.crowd_regions must be 'ignore' or 'drop', got {c.crowd_regions!r}")
        return c.crowd_ioa_threshold if c.crowd_regions == "ignore" else None

    def _select_mask_channel(self, mask_logits, classes):
        if self.config.roi_heads.class_agnostic_mask:
            return mask_logits[..., 0]
        return jnp.take_along_axis(mask_logits, classes[..., None, None, None], axis=-1)[..., 0]

    # -- training --------------------------------------------------------------------------------------------

    def losses(self, batch, key, train: bool = True):
        """batch: image [B, H, W, 3], image_size [B, 2], gt_boxes [B, G, 4], gt_classes [B, G],
        gt_is_crowd [B, G], gt_valid [B, G], gt_masks [B, G, M, M] (box-cropped, see ops.masks).
        Returns (total, {name: scalar}) with every loss in float32."""
        c = self.config
        images = batch["image"]
        gt_boxes = batch["gt_boxes"].astype(jnp.float32)
        gt_valid, gt_is_crowd = batch["gt_valid"], batch["gt_is_crowd"]
        rpn_key, roi_key = jax.random.split(key)

        levels = self._features(images, train)
        objectness, deltas, proposals, proposal_valid = self._proposals(levels, images, batch["image_size"], train)
        losses = rpn_losses(
            rpn_key,
            objectness,
            deltas,
            jnp.concatenate(self._anchors(images), axis=0),
            gt_boxes,
            gt_valid,
            gt_is_crowd,
            iou_thresholds=c.rpn.iou_thresholds,
            batch_size_per_image=c.rpn.batch_size_per_image,
            positive_fraction=c.rpn.positive_fraction,
            box_loss_beta=c.rpn.box_loss_beta,
            crowd_ioa_threshold=self._crowd_ioa_threshold(),
        )

        r = c.roi_heads
        sampled = sample_rois(
            roi_key,
            proposals,
            proposal_valid,
            gt_boxes,
            batch["gt_classes"],
            gt_valid,
            gt_is_crowd,
            batch_size_per_image=r.batch_size_per_image,
            positive_fraction=r.positive_fraction,
            iou_threshold=r.iou_threshold,
            crowd_ioa_threshold=self._crowd_ioa_threshold(),
        )
        pyramid = self._pooled_levels(levels)
        box_features = self._box_features(pyramid, sampled["rois"], train)
        class_logits, box_deltas = self.box_head(box_features)
        losses.update(box_head_losses(class_logits, box_deltas, sampled, gt_boxes, box_loss_beta=r.box_loss_beta))

        if c.mask_on or c.keypoint_on:
            ground_truth = {"gt_boxes": gt_boxes}
            if c.mask_on:
                ground_truth["gt_masks"] = batch["gt_masks"]
            if c.keypoint_on:
                ground_truth["gt_keypoints"] = batch["gt_keypoints"].astype(jnp.float32)
            # C4's mask head reads the sampled RoIs' res5 features, as detectron2's Res5ROIHeads does.
            res5_features = box_features if c.backbone.kind == "c4" else None
            losses.update(self._positive_roi_losses(pyramid, sampled, ground_truth, res5_features))
        losses = {name: value.astype(jnp.float32) for name, value in losses.items()}
        return sum(losses.values()), losses

    def _positive_roi_losses(self, pyramid, sampled, ground_truth, res5_features=None):
        """The mask and keypoint losses, which only positive RoIs carry, computed on the smallest bucket of RoIs
        that holds them all. res5_features: on C4, the sampled RoIs' res5 output, whose prefix the mask head reads.

        Positives come first in the sample, so a fixed-size prefix of it holds every one. The cap is
        batch_size_per_image * positive_fraction (128): a static size, as in the TF Model Garden. Torchvision and
        detectron2 instead run the mask and keypoint heads on exactly the positives (often a few dozen). A
        lax.switch over prefix sizes (16, 32, 64, 128 by default) gives the same losses and gradients while paying
        only for the smallest prefix that holds every positive of the batch; each size is compiled once, with the
        train step.
        """
        r = self.config.roi_heads
        num_positive_rois = int(r.batch_size_per_image * r.positive_fraction)
        sizes = mask_roi_buckets(num_positive_rois, r.mask_roi_buckets)

        def on_prefix(size):
            return lambda module, *operands: module._positive_roi_losses_on_prefix(size, *operands)

        operands = (pyramid, sampled, ground_truth, res5_features)
        if len(sizes) == 1:
            return on_prefix(sizes[0])(self, *operands)
        num_positive = jnp.max(jnp.sum(sampled["positive"][:, :num_positive_rois], axis=1))
        bucket = jnp.minimum(jnp.searchsorted(jnp.asarray(sizes), num_positive), len(sizes) - 1)
        return nn.switch(bucket, [on_prefix(size) for size in sizes], self, *operands)

    def _positive_roi_losses_on_prefix(self, size, pyramid, sampled, ground_truth, res5_features=None):
        c = self.config
        r = c.roi_heads
        rois = sampled["rois"][:, :size]
        positive = sampled["positive"][:, :size]
        matched = sampled["matched_gt"][:, :size]
        flat = lambda x: x.reshape(-1, *x.shape[2:])
        losses = {}
        if c.mask_on:
            if res5_features is not None:
                mask_features = res5_features[:, :size]
            else:
                mask_features = self._pool(pyramid, rois, r.mask_pool_size)
            mask_logits = self.mask_head(mask_features)
            targets = jax.vmap(ops.mask_targets_from_cropped, in_axes=(0, 0, 0, 0, None))(
                ground_truth["gt_masks"], ground_truth["gt_boxes"], rois, matched, self.mask_size
            )
            mask_loss = ops.sigmoid_mask_loss if r.mask_loss == "sigmoid" else ops.softmax_mask_loss
            losses["mask"] = mask_loss(flat(mask_logits), flat(targets), flat(sampled["classes"][:, :size]),
                                       flat(positive))
        if c.keypoint_on:
            losses["keypoint"] = self._keypoint_loss(pyramid, rois, positive, matched, ground_truth["gt_keypoints"])
        return losses

    def _keypoint_loss(self, pyramid, rois, positive, matched, gt_keypoints):
        """Cross-entropy over the m x m positions of each visible keypoint inside its positive RoI (the matched
        ground truth's keypoints as one-hot masks), normalised as keypoint_head.loss_normalization says, times
        keypoint_head.loss_weight."""
        c = self.config
        k = c.keypoint_head
        logits = self.keypoint_head(self._pool(pyramid, rois, k.pool_size))
        keypoints = jnp.take_along_axis(gt_keypoints, matched[:, :, None, None], axis=1)
        target_index, valid = ops.keypoint_targets(keypoints, rois, logits.shape[-2])
        valid = valid & positive[..., None]
        normalizer = None
        if k.loss_normalization == "fixed":
            normalizer = ops.detectron2_keypoint_loss_normalizer(
                rois.shape[0], k.num_keypoints, c.roi_heads.batch_size_per_image, c.roi_heads.positive_fraction)
        return k.loss_weight * ops.keypoint_loss(logits, target_index, valid, "detectron2", normalizer)

    # -- inference -------------------------------------------------------------------------------------------

    def predict(self, images, image_sizes):
        """images [B, H, W, 3] (normalised, padded canvas), image_sizes [B, 2] (h, w of the image inside it).
        Returns boxes [B, D, 4] (canvas pixels), scores [B, D], classes [B, D] (1..num_classes-1), valid [B, D],
        with mask_on masks [B, D, mask_size, mask_size] (probabilities of the predicted class), and with keypoint_on
        keypoint_heatmaps [B, D, m, m, K] (logits; serving/keypoints.py decodes them in each box)."""
        c = self.config
        levels = self._features(images, train=False)
        _, _, proposals, proposal_valid = self._proposals(levels, images, image_sizes, train=False)
        pyramid = self._pooled_levels(levels)
        class_logits, box_deltas = self.box_head(self._box_features(pyramid, proposals, train=False))
        d = c.detection
        boxes, scores, classes, valid = jax.vmap(
            lambda *args: detect(
                *args,
                score_threshold=d.score_threshold,
                nms_threshold=d.nms_threshold,
                detections_per_image=d.detections_per_image,
                pre_nms_topk=d.pre_nms_topk,
                min_size=d.min_size,
            )
        )(class_logits, box_deltas, proposals, proposal_valid, image_sizes)
        out = {"boxes": boxes, "scores": scores, "classes": classes, "valid": valid}
        if c.mask_on:
            mask_logits = self.mask_head(self._mask_features(pyramid, boxes, train=False))
            if c.roi_heads.mask_loss == "softmax":
                out["masks"] = ops.softmax_mask_probability(mask_logits, classes, c.roi_heads.softmax_mask_decoding)
            else:
                out["masks"] = jax.nn.sigmoid(self._select_mask_channel(mask_logits, classes))
        if c.keypoint_on:
            out["keypoint_heatmaps"] = self.keypoint_head(self._pool(pyramid, boxes, c.keypoint_head.pool_size))
        return out

    def __call__(self, images, image_sizes):
        return self.predict(images, image_sizes)


def mask_size(model_config) -> int:
    """The masks' side for a model config: the mask head doubles its input, which is the mask RoI pooling
    (roi_heads.mask_pool_size: 14 -> 28) or, on C4, res5's stride-2 output of the box pooling (14 -> 7 -> 14)."""
    r = model_config.roi_heads
    if model_config.backbone.kind == "c4":
        return 2 * -(-r.box_pool_size // 2)
    return 2 * r.mask_pool_size


def mask_roi_buckets(num_mask_rois, num_buckets):
    """Prefix sizes the mask head may run on: num_mask_rois halved (num_buckets - 1) times, smallest first."""
    if num_buckets < 1:
        raise ValueError(f"roi_heads.mask_roi_buckets must be >= 1, got {num_buckets}")
    sizes = {max(1, num_mask_rois >> k) for k in range(num_buckets)}
    return sorted(sizes)


def build_model(model_config: ml_collections.ConfigDict) -> MaskRCNN:
    return MaskRCNN(ml_collections.FrozenConfigDict(model_config))
