"""Probe a trained workdir's mask head on ground-truth boxes: how much probability it puts inside and outside the
objects, per decoding. Used to find why Table 2b's softmax run scored mask AP 0.0 (experiments/RESULTS.md).

    .venv/bin/python experiments/mask_probabilities.py --workdir=RUN --annotations=instances_val.json \
        --images_dir=val [--num_images=20]

For each non-crowd object of the first --num_images images, the mask head runs on the object's ground-truth box and
its m x m output is compared with the object's mask sampled at the m x m cell centres. Printed, as the 10th, 50th
and 90th percentiles over objects: the mean mask probability of the object's class inside and outside its mask
(sigmoid: sigmoid(logit[c]); softmax: p[c], and p[c] / (p[c] + p[0])), the largest one in the box, and the mask loss
on those targets.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from pycocotools import mask as mask_util

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn_jax import ops  # noqa: E402
from maskrcnn_jax.predict import read_image  # noqa: E402
from maskrcnn_jax.serving import host  # noqa: E402
from maskrcnn_jax.serving.predictor import Predictor  # noqa: E402


def mask_logits_on_boxes(module, images, boxes):
    """The mask head's logits [B, N, m, m, C] on `boxes` [B, N, 4] (canvas pixels)."""
    pyramid = module._pooled_levels(module._features(images, train=False))
    return module.mask_head(module._mask_features(pyramid, boxes, train=False))


def cell_centre_targets(full_mask, box, scale, mask_size):
    """The object's full-image mask read at the m x m cell centres of its canvas box (nearest image pixel)."""
    height, width = full_mask.shape
    centres = (np.arange(mask_size) + 0.5) / mask_size
    xs = ((box[0] + centres * (box[2] - box[0])) / scale).astype(int).clip(0, width - 1)
    ys = ((box[1] + centres * (box[3] - box[1])) / scale).astype(int).clip(0, height - 1)
    return full_mask[ys][:, xs].astype(np.float32)


def probe(predictor, annotations, images_dir, num_images):
    roi_heads = predictor.config.model.roi_heads
    softmax = roi_heads.mask_loss == "softmax"
    decodings = ops.SOFTMAX_MASK_DECODINGS if softmax else ("sigmoid",)
    run = jax.jit(lambda v, i, b: predictor.model.apply(v, i, b, method=mask_logits_on_boxes))
    by_image = {}
    for a in annotations["annotations"]:
        if not a.get("iscrowd"):
            by_image.setdefault(a["image_id"], []).append(a)
    stats = {name: {"inside": [], "outside": [], "largest": []} for name in decodings}
    losses = []
    for info in annotations["images"][:num_images]:
        objects = by_image.get(info["id"], [])
        if not objects:
            continue
        prepared = host.prepare_image(read_image(os.path.join(images_dir, info["file_name"])), predictor.spec)
        scale = prepared.image_size[0] / info["height"]
        boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in objects)], np.float32) * scale
        logits = run(predictor.variables, prepared.canvas[None], jnp.asarray(boxes[None]))[0]
        classes = jnp.asarray([a["category_id"] for a in objects])
        for k, (a, box) in enumerate(zip(objects, boxes)):
            rle = mask_util.frPyObjects(a["segmentation"], info["height"], info["width"])
            full = mask_util.decode(mask_util.merge(rle) if isinstance(rle, list) else rle)
            targets = cell_centre_targets(full, box, scale, logits.shape[1])
            one = logits[k : k + 1]
            if softmax:
                maps = {d: ops.softmax_mask_probability(one, classes[k : k + 1], d)[0] for d in decodings}
                losses.append(float(ops.softmax_mask_loss(one, targets[None], classes[k : k + 1], np.ones(1, bool))))
            else:
                maps = {"sigmoid": jax.nn.sigmoid(one[0, ..., 0 if one.shape[-1] == 1 else int(classes[k])])}
                losses.append(float(ops.sigmoid_mask_loss(one, targets[None], classes[k : k + 1], np.ones(1, bool))))
            for name, probability in maps.items():
                probability = np.asarray(probability)
                stats[name]["inside"].append(probability[targets > 0].mean())
                stats[name]["outside"].append(probability[targets == 0].mean())
                stats[name]["largest"].append(probability.max())
    return stats, losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--annotations", required=True, help="COCO instances JSON of the images")
    parser.add_argument("--images_dir", required=True)
    parser.add_argument("--num_images", type=int, default=20)
    args = parser.parse_args(argv)
    predictor = Predictor.from_checkpoint(args.workdir)
    with open(args.annotations) as f:
        annotations = json.load(f)
    stats, losses = probe(predictor, annotations, args.images_dir, args.num_images)
    percentiles = lambda values: " ".join(f"{v:.3f}" for v in np.percentile(values, [10, 50, 90]))
    print(f"{len(losses)} objects; mask loss on them {np.mean(losses):.3f}; percentiles 10 / 50 / 90 over objects:")
    for name, values in stats.items():
        print(f"  {name:18s} inside {percentiles(values['inside'])} | outside {percentiles(values['outside'])} | "
              f"largest {percentiles(values['largest'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
