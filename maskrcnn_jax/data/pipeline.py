"""tf.data input pipelines that turn a built COCO-format TFDS dataset into fixed-shape NumPy batches.

Batch contract (B = per-process batch size, G = options.max_instances, M = options.mask_size,
(Hc, Wc) = options.canvas_size, K = the dataset's keypoint count, `load_keypoint_schema(builder).num_keypoints`).
Every batch of a pipeline has exactly these shapes and dtypes.

Training (`train_dataset`, `TrainIterator`):
  image          uint8   [B, Hc, Wc, 3]  RGB pixels (the bilinear resize rounded; ops.normalize_canvas normalises them
                                         on the device), or with train_image_dtype="float32" float32
                                         (pixel - pixel_mean) / pixel_std; the image occupies the top-left
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

Evaluation (`eval_dataset`, `eval_batches`): image (always float32, normalised: exactly what the serving host
prepares), image_id, original_size, image_scale, image_size as above (no jitter, crop or flip, so original =
canvas / image_scale), plus
  example_valid  bool    [B]             False for the padding examples that fill a batch (image_id -1)
and, with `with_ground_truth=True`, the five gt_* fields (six with keypoints). `eval_plan` first reads every
example's stored size (no pixels) and gives each its resized size and canvas by data/image_resize.py's rules, the
ones the Predictor uses. With options.eval_canvas "fixed" every batch is on the (Hc, Wc) canvas. With "padded"
each example is on its own canvas (padded_canvas of its resized size) and the batches are grouped by canvas,
smallest first, each canvas with a number of batches that is the same on every process (the most any shard needs;
the others pad with invalid examples). So every process yields the same sequence of batch shapes, one fixed shape
per batch, and a global batch can be assembled from the processes' rows at every step.

Randomness: the shuffle order of epoch e is seeded by (seed, shard, e); the jitter/crop/flip of the example
at stream position p by (seed, shard, p), with stateless ops. So a stream is a pure function of
(seed, shard_index, shard_count, batch size, options), and `start_batch=n` resumes exactly where a run that
had consumed n batches stopped. Resuming reads (without decoding) at most one epoch of records to
rebuild the shuffle position. Set options.deterministic=False to trade this for throughput.

TensorFlow is told to use no GPU here, so it never competes with JAX for accelerator memory.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from maskrcnn_jax.data import image_resize, keypoints, transforms
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


def _padding_example(options: InputOptions, with_ground_truth: bool, num_keypoints: int,
                     canvas_size: tuple[int, int]) -> dict[str, tf.Tensor]:
    canvas_h, canvas_w = canvas_size
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


def stored_image_sizes(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
    """int [N, 2] (height, width) of every example of `split` in storage order, read from the records' stored
    sizes (no image is decoded)."""
    num_examples = _check_split(builder, split)
    if num_examples == 0:
        return np.zeros((0, 2), np.int64)
    sizes = _read(builder, split, 0, num_examples).map(
        lambda example: tf.stack([tf.cast(example["height"], tf.int64), tf.cast(example["width"], tf.int64)]),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(4096)
    return np.concatenate(list(tfds.as_numpy(sizes)))


def eval_geometry(image_sizes: np.ndarray, options: InputOptions) -> tuple[np.ndarray, np.ndarray]:
    """(resized [N, 2], canvases [N, 2]) ints of images of original `image_sizes` [N, 2] at evaluation: each image's
    resized size by image_resize.resized_size (the host's rule, in the peers' arithmetic), and its canvas, the
    fixed one or with eval_canvas "padded" image_resize.padded_canvas of the resized size."""
    image_sizes = np.asarray(image_sizes).reshape(-1, 2)
    resized = np.asarray([image_resize.resized_size(h, w, options.canvas_size, options.short_side,
                                                    options.long_side_max, options.size_rounding)
                          for h, w in image_sizes], np.int64).reshape(-1, 2)
    if options.eval_canvas == "fixed":
        canvases = np.tile(np.asarray(options.canvas_size, np.int64), (len(resized), 1))
    else:
        canvases = np.asarray([image_resize.padded_canvas(size, options.size_divisibility, options.eval_canvas_step,
                                                          options.eval_canvas_sides) for size in resized],
                              np.int64).reshape(-1, 2)
    return resized, canvases


class EvalGroup(NamedTuple):
    """The evaluation batches of one canvas on this process: `positions` are the indices (within the process'
    shard, in storage order) of its examples, `resized` the shard's resized sizes (all of them, indexed by position),
    and `num_batches` the batches of this canvas that every process yields."""

    canvas: tuple[int, int]
    positions: np.ndarray
    resized: np.ndarray
    num_batches: int


def eval_plan(builder: tfds.core.DatasetBuilder, options: InputOptions, *, batch_size: int, shard_index: int = 0,
              shard_count: int = 1, split: str = "validation") -> list[EvalGroup]:
    """This process' evaluation batches grouped by canvas, smallest canvas first (one group on a fixed canvas). Each
    canvas has, on every process, the batches the shard with the most examples on it needs. The sizes come from the
    records' stored image sizes (no image is decoded)."""
    num_examples = _check_split(builder, split)
    bounds = [shard_bounds(num_examples, i, shard_count, drop_remainder=False) for i in range(shard_count)]
    start, end = bounds[shard_index]
    resized, canvases = eval_geometry(stored_image_sizes(builder, split), options)
    plan = []
    for canvas in sorted({tuple(int(v) for v in c) for c in canvases}):
        on_canvas = np.all(canvases == canvas, axis=1)
        num_batches = max(math.ceil(on_canvas[lo:hi].sum() / batch_size) for lo, hi in bounds)
        plan.append(EvalGroup(canvas, np.flatnonzero(on_canvas[start:end]), resized[start:end], num_batches))
    return plan


def eval_dataset(builder: tfds.core.DatasetBuilder, options: InputOptions, *, batch_size: int,
                 shard_index: int = 0, shard_count: int = 1, split: str = "validation",
                 with_ground_truth: bool = False) -> tuple[tf.data.Dataset, int]:
    """(dataset, num_batches): every example of this process' shard once, padded with invalid examples so that
    every process yields the same `num_batches` full batches of the same shapes: in storage order on the fixed
    canvas, or grouped by canvas as eval_plan lists them (storage order within a canvas)."""
    hide_accelerators_from_tensorflow()
    if (options.eval_canvas == "fixed" and options.short_side is not None
            and min(options.canvas_size) < options.long_side_max):
        raise ValueError(f"canvas {options.canvas_size} cannot hold every evaluation image: with "
                         f"long_side_max={options.long_side_max} both canvas sides must be at least that")
    start, end = shard_bounds(_check_split(builder, split), shard_index, shard_count, drop_remainder=False)
    plan = eval_plan(builder, options, batch_size=batch_size, shard_index=shard_index, shard_count=shard_count,
                     split=split)
    if not plan:  # an empty split
        plan = [EvalGroup(tuple(options.canvas_size), np.zeros([0], np.int64), np.zeros([0, 2], np.int64), 0)]
    num_keypoints = _num_keypoints(builder)
    stream = None
    for canvas, positions, resized, num_batches in plan:
        group = tf.data.Dataset.from_tensors(
            _padding_example(options, with_ground_truth, num_keypoints, canvas)).repeat(
                num_batches * batch_size - len(positions))
        if len(positions):
            examples = _read(builder, split, start, end).enumerate()
            if len(positions) < end - start:  # the shard is read once per canvas, and decoded once in all
                selected = np.zeros(end - start, bool)
                selected[positions] = True
                selected = tf.constant(selected)
                examples = examples.filter(lambda i, _: selected[i])
            sizes = tf.constant(resized, tf.int32)
            examples = examples.map(
                lambda i, example, canvas=canvas: transforms.eval_example(
                    example, options, with_ground_truth, num_keypoints, canvas, sizes[i]),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            group = examples.concatenate(group)
        group = group.batch(batch_size, drop_remainder=True)
        stream = group if stream is None else stream.concatenate(group)
    return stream.prefetch(tf.data.AUTOTUNE).with_options(_options(True)), sum(g.num_batches for g in plan)


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
