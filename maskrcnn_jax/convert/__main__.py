r"""Import a torchvision or detectron2 checkpoint into a workdir.

    python -m maskrcnn_jax.convert --from=torchvision maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --out=WORKDIR
    python -m maskrcnn_jax.convert --from=torchvision maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --out=WORKDIR \
        --class_slots=coco80                         # 81 contiguous labels, for our COCO pipeline / evaluation
    python -m maskrcnn_jax.convert --from=torchvision keypointrcnn_resnet50_fpn_coco-fc266e95.pth --out=WORKDIR
    python -m maskrcnn_jax.convert --from=detectron2 model_final_f10217.pkl --out=WORKDIR
    python -m maskrcnn_jax.convert --from=torchvision resnet50-11ad3fa6.pth --out=WORKDIR \
        --config=configs/coco_r50_fpn_1x.py          # an ImageNet backbone as the start of training

`--config` (an ml_collections config file, overridable with --config.a.b=value) describes the model that receives
the weights; it defaults to configs/torchvision_maskrcnn_r50_fpn.py (configs/torchvision_keypointrcnn_r50_fpn.py for
a Keypoint R-CNN file) or configs/detectron2_maskrcnn_r50_fpn.py.
Reading .pth files needs torch (the `parity` extra).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from maskrcnn_jax.convert.checkpoint import write_checkpoint
from maskrcnn_jax.convert.coco_categories import COCO_PERSON_KEYPOINTS, coco_category_map
from maskrcnn_jax.convert.configs import SOURCES, default_config
from maskrcnn_jax.convert.finetune import COCO_CATEGORY_IDS, keep_class_slots
from maskrcnn_jax.convert.detectron2 import RefusedPickleError, from_detectron2, load_detectron2_pickle
from maskrcnn_jax.convert.torchvision import from_torchvision, is_keypoint_state_dict, load_torch_file
from maskrcnn_jax.engine.workdir import write_categories, write_keypoint_schema

flags.DEFINE_enum("from", None, SOURCES, "Which library wrote the checkpoint.")
flags.DEFINE_string("out", None, "Workdir to write the Orbax checkpoint and config.json into.")
flags.DEFINE_enum("class_slots", "all", ["all", "coco80"],
                  "torchvision only: 'coco80' keeps the background and the 80 used COCO ids of its 91 label slots, "
                  "in id order, i.e. the contiguous labels 1..80 of our COCO pipeline (sets model.num_classes=81).")
flags.DEFINE_enum("input_order", "rgb", ["rgb", "bgr"], "detectron2 only: the channel order our pipeline feeds.")
config_flags.DEFINE_config_file("config", None, "Config of the receiving model.", lock_config=True)
flags.mark_flags_as_required(["from", "out"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("give exactly one checkpoint file")
    source, path = FLAGS["from"].value, argv[1]
    if source == "torchvision":
        state_dict = load_torch_file(path)
        keypoints = is_keypoint_state_dict(state_dict)
        config = FLAGS.config or default_config("torchvision_keypoints" if keypoints else "torchvision")
        imported = from_torchvision(state_dict, norm=config.model.backbone.norm,
                                    backbone_kind=config.model.backbone.kind)
        if FLAGS.class_slots == "coco80":
            imported = keep_class_slots(imported, (0, *COCO_CATEGORY_IDS))
            config.model.num_classes = 1 + len(COCO_CATEGORY_IDS)
    else:
        if FLAGS.class_slots != "all":
            raise app.UsageError("--class_slots applies to torchvision checkpoints only")
        try:
            weights = load_detectron2_pickle(path)
        except RefusedPickleError as error:
            sys.exit(f"error: {error}")  # one line, exit status 1; nothing of the file ran
        c4 = any(key.startswith("roi_heads.res5.") for key in weights)
        config = FLAGS.config or default_config("detectron2_c4" if c4 else "detectron2")
        imported = from_detectron2(weights, norm=config.model.backbone.norm, input_order=FLAGS.input_order,
                                   backbone_kind=config.model.backbone.kind)
    directory = write_checkpoint(FLAGS.out, config, imported)
    categories = coco_category_map(config.model.num_classes)
    if categories is not None:
        write_categories(FLAGS.out, categories)
    else:
        logging.warning("%d classes is not a COCO layout: no categories.json written; prediction takes the names "
                        "from the config's dataset", config.model.num_classes)
    if config.model.keypoint_on and config.model.keypoint_head.num_keypoints == 17:
        write_keypoint_schema(FLAGS.out, COCO_PERSON_KEYPOINTS)
    logging.info("wrote %s (step 0) and %s/config.json", directory, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
