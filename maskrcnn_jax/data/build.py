"""Builds a COCO-format dataset into TFDS records, once; training and evaluation then read the records.

COCO 2017 (the layout as downloaded):

    python -m maskrcnn_jax.data.build --name=coco2017 --data_dir=$HOME/tensorflow_datasets \\
        --train_json=coco/annotations/instances_train2017.json --train_images=coco/train2017 \\
        --val_json=coco/annotations/instances_val2017.json --val_images=coco/val2017

Your own dataset: the same command with your JSON files and image folders (either split may be left out).
`--shapes_dir=DIR` first writes the built-in synthetic shapes dataset into DIR and builds that instead.
The build prints a summary of what it wrote and what it skipped and why.

The files are read as untrusted (data/options.py's BuildOptions): a file_name outside its image folder is an error
unless `--allow_paths_outside_images_dir`, and an image whose header claims more than `--max_image_pixels` pixels is
skipped undecoded.
"""

from __future__ import annotations

from absl import app, flags

from maskrcnn_jax.data.options import BuildOptions

FLAGS = flags.FLAGS
flags.DEFINE_string("name", None, "Dataset name (the TFDS config name), e.g. coco2017.", required=True)
flags.DEFINE_string("data_dir", None, "TFDS data directory to write into.", required=True)
flags.DEFINE_string("train_json", None, "COCO-format annotation JSON of the training split.")
flags.DEFINE_string("train_images", None, "Folder that train_json's file_names are relative to.")
flags.DEFINE_string("val_json", None, "COCO-format annotation JSON of the validation split.")
flags.DEFINE_string("val_images", None, "Folder that val_json's file_names are relative to.")
flags.DEFINE_bool("allow_paths_outside_images_dir", BuildOptions.allow_paths_outside_images_dir,
                  "Read image file_names that resolve outside their image folder (absolute, ../, links out of it) "
                  "instead of stopping with an error.")
flags.DEFINE_integer("max_image_pixels", BuildOptions.max_image_pixels,
                     "Skip (undecoded, counted as too_many_pixels) images whose header claims more pixels than this; "
                     "the default is PIL's own hard stop.", lower_bound=1)
flags.DEFINE_string("shapes_dir", None, "Write the synthetic shapes dataset here and build it.")
flags.DEFINE_integer("shapes_num_train", 2000, "Synthetic training images (with --shapes_dir).")
flags.DEFINE_integer("shapes_num_val", 200, "Synthetic validation images (with --shapes_dir).")
flags.DEFINE_integer("shapes_seed", 0, "Seed of the synthetic dataset (with --shapes_dir).")


def main(argv):
    del argv
    # Imported here so `--help` stays fast and TensorFlow starts only when there is work.
    from maskrcnn_jax.data import coco_dataset
    from maskrcnn_jax.data import synthetic
    config = {"name": FLAGS.name, "data_dir": FLAGS.data_dir, "train_json": FLAGS.train_json,
              "train_images": FLAGS.train_images, "val_json": FLAGS.val_json, "val_images": FLAGS.val_images,
              "allow_paths_outside_images_dir": FLAGS.allow_paths_outside_images_dir,
              "max_image_pixels": FLAGS.max_image_pixels}
    if FLAGS.shapes_dir:
        config.update(synthetic.generate(FLAGS.shapes_dir, FLAGS.shapes_num_train, FLAGS.shapes_num_val,
                                         FLAGS.shapes_seed))
    builder = coco_dataset.get_builder(config)
    if builder.is_prepared():
        print(f"{builder.data_dir} is already built; delete it or pick a new --name to rebuild.")
    else:
        builder.download_and_prepare()
    print(coco_dataset.format_summary(coco_dataset.build_summary(builder)))
    categories = coco_dataset.load_category_map(builder)
    print(f"{categories.num_classes} categories: " + ", ".join(
        f"{categories.category_id(label)}->{label} {categories.name(label)}"
        for label in range(1, categories.num_classes + 1)))
    print(f"data: {builder.data_dir}")


if __name__ == "__main__":
    app.run(main)
