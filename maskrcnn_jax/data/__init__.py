"""The data floor: COCO-format datasets -> TFDS records -> tf.data -> fixed-shape NumPy batches.

The only floor that imports TensorFlow; it never imports JAX. Modules:
  coco_format    reading and validating COCO-format JSON, images and masks (no TensorFlow)
  coco_dataset   the TFDS builder `CocoInstances` and `get_builder` / `build` / `load_category_map` /
                 `load_keypoint_schema`
  build          the command line: python -m maskrcnn_jax.data.build --name=... --data_dir=... --train_json=...
  keypoints      a dataset's keypoint schema (names, skeleton, OKS sigmas) and the flip swap of left/right types
  synthetic      the built-in synthetic shapes dataset, written as a COCO-format folder
  stick_figures  the built-in keypoint dataset (articulated stick figures), written as a COCO keypoints folder
  polygons       exact polygon clipping used by `synthetic` for occlusion
  options        `InputOptions`, what the pipeline does to each example (no TensorFlow; the data.* config fields)
  image_resize   the resize rule, shared with the serving host (no imports at all)
  transforms     per-example decode / resize / crop / flip / pad / mask cropping
  pipeline       `train_dataset`, `TrainIterator`, `eval_dataset`, `eval_batches` and the batch contract
  devices        `hide_accelerators_from_tensorflow`: TensorFlow stays on the host
"""
