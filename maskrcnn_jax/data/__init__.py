"""The data floor: COCO-format datasets -> TFDS records -> tf.data -> fixed-shape NumPy batches.

The only floor that imports TensorFlow; it never imports JAX. Modules:
  coco_format  reading and validating COCO-format JSON, images and masks (no TensorFlow)
  builder      the TFDS builder `CocoInstances` and `get_builder` / `build` / `load_category_map`
  build        the command line: python -m maskrcnn_jax.data.build --name=... --data_dir=... --train_json=...
  synthetic    the built-in synthetic shapes dataset, written as a COCO-format folder
  polygons     exact polygon clipping used by `synthetic` for occlusion
  transforms   per-example decode / resize / crop / flip / pad / mask cropping (`InputOptions`)
  pipeline     `train_dataset`, `TrainIterator`, `eval_dataset`, `eval_batches` and the batch contract
  devices      `hide_accelerators_from_tensorflow`: TensorFlow stays on the host
"""
