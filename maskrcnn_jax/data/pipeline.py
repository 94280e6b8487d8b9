"""tf.data input pipelines that turn a built COCO-format TFDS dataset into fixed-shape NumPy batches.

Batch contract (B = per-process batch size, G = options.max_instances, M = options.mask_size,
(Hc, Wc) = options.canvas_size, K = the dataset's keypoint count, `load_keypoint_schema(builder).num_keypoints`).
Every batch of a pipeline has exactly these shapes and dtypes.

Training (`train_dataset`, `TrainIterator`):
  image          float32 [B, Hc, Wc, 3]  RGB, (pixel - pixel_mean) / pixel_std; the image occupies the top-left
                                         `image_size` window, the rest is 0
  gt_boxes       float32 [B, G, 4]       xyxy in canvas pixels (continuous: pixel k covers [k, k+1)); 0 if invalid
  gt_classes     int32   [B, G]          contiguous labels 1..K; 0 where invalid
  gt_is_crowd    bool    [B, G]          crowd (ignore) regions; only ever true where gt_valid
  gt_valid       bool    [B, G]          real instances (crowd regions included); padding and boxes cropped away
                                         are False
  gt_masks       float32 [B, G, M, M]    (or uint8 {0,1} with mask_dtype="uint8") each instance's mask cropped to
                                         its canvas box: cell (i, j) samples the mask bilinearly at
                                         x = x1 + (j + 0.5) (x2 - x1) / M, y = y1 + (i + 0.5) (y2 - y1) / M;
                                         zeros where invalid
  gt_keypoints   float32 [B, G, K, 3]    only for datasets with keypoints: (x, y, v) in canvas pixels, transformed
                                         like the boxes (v: 1 labelled but hidden, 2 visible, as in the JSON);
                                         (0, 0, 0) for unlabelled keypoints, keypoints outside the image window,
                                         invalid instances and padding. A flipped example's keypoint types are
                                         swapped (left_X <-> right_X) through options.keypoint_flip_map, or the
                                         pairs derived from the names when that is empty
  image_id       int64   [B]             the annotation JSON's image id
  original_size  int32   [B, 2]          (height, width) of the upright original image
  image_scale    float32 [B, 2]          (sy, sx): canvas = original * scale - crop_offset, then mirrored when flipped
  image_size     int32   [B, 2]          (height, width) of the image window inside the canvas
  crop_offset    float32 [B, 2]          (y, x) of the window in the scaled image (non-zero only with jitter > canvas)
  flipped        bool    [B]             mirrored horizontally (x -> image_size_w - x)

Evaluation (`eval_dataset`, `eval_batches`): image, image_id, original_size, image_scale, image_size as above
(no jitter, crop or flip, so original = canvas / image_scale), plus
  example_valid  bool    [B]             False for the padding examples that fill the last batch (image_id -1)
and, with `with_ground_truth=True`, the five gt_* fields (six with keypoints). Every process gets the same number
of batches.

Randomness: the shuffle order of epoch e is seeded by (seed, shard, e); the jitter/crop/flip of the example
at stream position p by (seed, shard, p), with stateless ops. So a stream is a pure function of
(seed, shard_index, shard_count, batch size, options), and `start_batch=n` resumes exactly where a run that
had consumed n batches stopped. Resuming reads (without decoding) at most one epoch of records to
rebuild the shuffle position. Set options.deterministic=False to trade this for throughput.

TensorFlow is told to use no GPU here, so it never competes with JAX for accelerator memory.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from maskrcnn_jax.data import keypoints, transforms
from maskrcnn_jax.data.coco_dataset import load_keypoint_schema
from maskrcnn_jax.data.devices import hide_accelerators_from_tensorflow
from maskrcnn_jax.data.transforms import InputOptions

_DECODERS = {"image": tfds.decode.SkipDecoding(), "objects": {"mask": tfds.decode.SkipDecoding()}}


def shard_bounds(num_examples: int, shard_index: int, shard_count: int, drop_remainder: bool) -> tuple[int, int]:
    """[start, end) of this process' contiguous slice. With drop_remainder every shard has
    num_examples // shard_count examples; without it the first num_examples % shard_count get one more."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is outside 0..{shard_count - 1}")
    base, extra = divmod(num_examples, shard_count)
    if drop_remainder:
        return shard_index * base, (shard_index + 1) * base
    start = shard_index * base + min(shard_index, extra)
    return start, start + base + (1 if shard_index < extra else 0)


def _read(builder: tfds.core.DatasetBuilder, split: str, start: int, end: int) -> tf.data.Dataset:
    """Parsed examples [start, end) of `split` in storage order; image and masks stay encoded."""
    read_config = tfds.ReadConfig(try_autocache=False, add_tfds_id=False)
    return builder.as_dataset(split=f"{split}[{start}:{end}]", shuffle_files=False, decoders=_DECODERS,
                              read_config=read_config)


def _options(deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_optimization.map_parallelization = True
    return options


def _check_split(builder: tfds.core.DatasetBuilder, split: str) -> int:
    if split not in builder.info.splits:
        raise ValueError(f"dataset {builder.data_dir} has no split '{split}' (has {list(builder.info.splits)})")
    return builder.info.splits[split].num_examples


def _num_keypoints(builder: tfds.core.DatasetBuilder) -> int:
    schema = load_keypoint_schema(builder)
    return schema.num_keypoints if schema else 0


def _keypoint_flip(builder: tfds.core.DatasetBuilder, options: InputOptions) -> tuple[int, ...] | None:
    """The flip permutation of the dataset's keypoints (identity without random flips), or None without keypoints.
    Raises ValueError for a flip map that does not fit the dataset's keypoint names."""
    schema = load_keypoint_schema(builder)
    if schema is None:
        return None
    if not options.random_flip:
        return tuple(range(schema.num_keypoints))
    return keypoints.flip_permutation(schema.names, options.keypoint_flip_map)


def train_dataset(builder: tfds.core.DatasetBuilder, options: InputOptions, *, batch_size: int, seed: int,
                  shard_index: int = 0, shard_count: int = 1, start_batch: int = 0,
                  split: str = "train") -> tf.data.Dataset:
    """Endless shuffled, augmented, batched training examples of this process' shard (see module doc).

    `shard_index`/`shard_count` are this process' index and the number of processes (e.g.
    jax.process_index() / jax.process_count()); `batch_size` is per process. Every shard holds the same
    number of examples (the remainder is dropped), so all processes agree on where epochs end.
    """
    hide_accelerators_from_tensorflow()
    start, end = shard_bounds(_check_split(builder, split), shard_index, shard_count, drop_remainder=True)
    epoch_length = end - start
    if epoch_length == 0:
        raise ValueError(f"split '{split}' has fewer examples than the {shard_count} processes reading it")
    keypoint_flip = _keypoint_flip(builder, options)
    examples = _read(builder, split, start, end)
    shard_seed = tf.constant([seed, shard_index], tf.int64)

    def one_epoch(epoch):
        epoch_seed = tf.random.stateless_uniform(
            [], tf.random.experimental.stateless_fold_in(shard_seed, epoch), minval=None, maxval=None,
            dtype=tf.int64)
        return examples.shuffle(min(options.shuffle_buffer, epoch_length), seed=epoch_seed,
                                reshuffle_each_iteration=False)

    consumed = start_batch * batch_size
    stream = tf.data.Dataset.range(consumed // epoch_length, np.iinfo(np.int64).max).flat_map(one_epoch)
    stream = stream.skip(consumed % epoch_length).enumerate(start=consumed)

    def augment(position, example):
        key = tf.random.experimental.stateless_fold_in(shard_seed, position)
        return transforms.train_example(example, key, options, keypoint_flip)

    stream = stream.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=options.deterministic)
    stream = stream.batch(batch_size, drop_remainder=True)
    return stream.prefetch(tf.data.AUTOTUNE).with_options(_options(options.deterministic))


def _padding_example(options: InputOptions, with_ground_truth: bool, num_keypoints: int) -> dict[str, tf.Tensor]:
    canvas_h, canvas_w = options.canvas_size
    g, m = options.max_instances, options.mask_size
    features = {
        "image": tf.zeros([canvas_h, canvas_w, 3], tf.float32),
        "image_id": tf.constant(-1, tf.int64),
        "original_size": tf.zeros([2], tf.int32),
        "image_scale": tf.ones([2], tf.float32),
        "image_size": tf.zeros([2], tf.int32),
        "example_valid": tf.constant(False),
    }
    if with_ground_truth:
        features.update({
            "gt_boxes": tf.zeros([g, 4], tf.float32), "gt_classes": tf.zeros([g], tf.int32),
            "gt_is_crowd": tf.zeros([g], tf.bool), "gt_valid": tf.zeros([g], tf.bool),
            "gt_masks": tf.zeros([g, m, m], tf.as_dtype(options.mask_dtype)),
        })
        if num_keypoints:
            features["gt_keypoints"] = tf.zeros([g, num_keypoints, 3], tf.float32)
    return features


def eval_dataset(builder: tfds.core.DatasetBuilder, options: InputOptions, *, batch_size: int,
                 shard_index: int = 0, shard_count: int = 1, split: str = "validation",
                 with_ground_truth: bool = False) -> tuple[tf.data.Dataset, int]:
    """(dataset, num_batches): every example of this process' shard once, in storage order, padded with
    invalid examples so that every process yields the same `num_batches` full batches."""
    hide_accelerators_from_tensorflow()
    if options.short_side is not None and min(options.canvas_size) < options.long_side_max:
        raise ValueError(f"canvas {options.canvas_size} cannot hold every evaluation image: with "
                         f"long_side_max={options.long_side_max} both canvas sides must be at least that")
    num_examples = _check_split(builder, split)
    start, end = shard_bounds(num_examples, shard_index, shard_count, drop_remainder=False)
    num_batches = math.ceil(math.ceil(num_examples / shard_count) / batch_size)
    padding = num_batches * batch_size - (end - start)
    num_keypoints = _num_keypoints(builder)
    stream = _read(builder, split, start, end).map(
        lambda example: transforms.eval_example(example, options, with_ground_truth, num_keypoints),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    stream = stream.concatenate(
        tf.data.Dataset.from_tensors(_padding_example(options, with_ground_truth, num_keypoints)).repeat(padding))
    stream = stream.batch(batch_size, drop_remainder=True)
    return stream.prefetch(tf.data.AUTOTUNE).with_options(_options(True)), num_batches


def eval_batches(builder: tfds.core.DatasetBuilder, options: InputOptions, **kwargs: Any
                 ) -> Iterator[dict[str, np.ndarray]]:
    """NumPy batches of `eval_dataset` (same arguments)."""
    dataset, _ = eval_dataset(builder, options, **kwargs)
    return iter(tfds.as_numpy(dataset))


class TrainIterator:
    """NumPy batches of `train_dataset` that count what they hand out, so a checkpoint can store the position.

        iterator = TrainIterator(builder, options, batch_size=8, seed=0, start_batch=restored_step)
        batch = next(iterator)               # dict of NumPy arrays, see the module doc
        save(..., data_position=iterator.batches_consumed)
    """

    def __init__(self, builder: tfds.core.DatasetBuilder, options: InputOptions, *, batch_size: int, seed: int,
                 shard_index: int = 0, shard_count: int = 1, start_batch: int = 0, split: str = "train"):
        self.batches_consumed = start_batch
        self._iterator = iter(tfds.as_numpy(train_dataset(
            builder, options, batch_size=batch_size, seed=seed, shard_index=shard_index,
            shard_count=shard_count, start_batch=start_batch, split=split)))

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self.batches_consumed += 1
        return batch
