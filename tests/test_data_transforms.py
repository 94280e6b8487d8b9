"""Input transforms and pipelines against NumPy references: flip, resize, crop, pad, mask crops, batch contract."""

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")

from maskrcnn_jax.data import coco_dataset  # noqa: E402
from maskrcnn_jax.data import image_resize, pipeline, synthetic, transforms  # noqa: E402
from maskrcnn_jax.data.transforms import InputOptions  # noqa: E402


# ----------------------------------------------------------------------------------------------------
# NumPy references.


def _linear_weights(coordinates, size):
    """Index coordinates (pixel centres at integers) clamped to [0, size - 1] -> (low, high, fraction)."""
    coordinates = np.clip(coordinates, 0.0, size - 1.0)
    low = np.floor(coordinates).astype(int)
    high = np.minimum(low + 1, size - 1)
    return low, high, coordinates - low


def bilinear_sample(image, x, y):
    """Sample image [H, W, ...] at continuous pixel coordinates x [N], y [K] (centres at k + 0.5), clamped
    to the edge pixels -> [K, N, ...]."""
    image = np.asarray(image, np.float64)
    x0, x1, fx = _linear_weights(np.asarray(x, np.float64) - 0.5, image.shape[1])
    y0, y1, fy = _linear_weights(np.asarray(y, np.float64) - 0.5, image.shape[0])
    extra = (None,) * (image.ndim - 2)
    fx, fy = fx[(None, slice(None)) + extra], fy[(slice(None), None) + extra]
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def reference_crop(mask, box, m):
    """The documented convention: cell (i, j) samples at x1 + (j + 0.5) w / m, y1 + (i + 0.5) h / m."""
    x1, y1, x2, y2 = box
    xs = x1 + (np.arange(m) + 0.5) * (x2 - x1) / m
    ys = y1 + (np.arange(m) + 0.5) * (y2 - y1) / m
    return bilinear_sample(mask, xs, ys)


def reference_resize(image, out_h, out_w):
    """tf.image.resize bilinear (half-pixel centres, no antialiasing): output pixel i samples the input at
    continuous coordinate (i + 0.5) * in / out."""
    in_h, in_w = image.shape[:2]
    xs = (np.arange(out_w) + 0.5) * in_w / out_w
    ys = (np.arange(out_h) + 0.5) * in_h / out_h
    return bilinear_sample(image, xs, ys)


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _random_boxes(rng, n, height, width, min_side=0.3):
    x = np.sort(rng.uniform(0, width, (n, 2)), axis=1)
    y = np.sort(rng.uniform(0, height, (n, 2)), axis=1)
    boxes = np.stack([x[:, 0], y[:, 0], np.maximum(x[:, 1], x[:, 0] + min_side),
                      np.maximum(y[:, 1], y[:, 0] + min_side)], axis=1)
    boxes[0] = [0.0, 0.0, width, height]  # the whole image: every border sample is clamped
    boxes[1] = [width - 2.5, height - 1.25, width, height]  # a sub-cell box in the corner
    return np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Mask cropping.


@pytest.mark.parametrize("mask_size", [1, 5, 28])
def test_crop_masks_to_boxes_matches_reference(rng, mask_size):
    height, width, n = 23, 31, 9
    soft = rng.uniform(0, 1, (n, height, width)).astype(np.float32)
    binary = (rng.uniform(0, 1, (n, height, width)) < 0.5).astype(np.uint8)
    boxes = _random_boxes(rng, n, height, width)
    for masks in (soft, binary):
        crops = transforms.crop_masks_to_boxes(tf.constant(masks[..., None]), tf.constant(boxes), mask_size).numpy()
        assert crops.shape == (n, mask_size, mask_size) and crops.dtype == np.float32
        for g in range(n):
            np.testing.assert_allclose(crops[g], reference_crop(masks[g], boxes[g], mask_size), rtol=1e-5, atol=2e-5)


def test_crop_masks_agrees_with_ops_crop(rng):
    ops_masks = pytest.importorskip("maskrcnn_jax.ops.masks")
    if not hasattr(ops_masks, "crop_masks_to_boxes"):
        pytest.skip("ops has no crop_masks_to_boxes")
    height, width, n, m = 40, 36, 7, 14
    masks = (rng.uniform(0, 1, (n, height, width)) < 0.3).astype(np.uint8)
    boxes = _random_boxes(rng, n, height, width, min_side=2.0)
    ours = transforms.crop_masks_to_boxes(tf.constant(masks[..., None]), tf.constant(boxes), m).numpy()
    theirs = np.asarray(ops_masks.crop_masks_to_boxes(masks, boxes, m, sampling_ratio=1))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------------
# Box transform with explicit parameters.


def test_transform_boxes_scale_crop_clip_flip():
    boxes = np.asarray([[2, 1, 6, 4],      # inside the window after scaling and cropping
                        [0, 0, 20, 20],    # larger than the window: clipped to it
                        [0, 0, 4, 2.5],    # ends above the window's top: cropped away
                        [9, 3, 12, 5]], np.float32)  # starts right of the window: cropped away
    scale_yx, offset_yx, content = np.float32([2, 3]), np.int32([5, 0]), np.int32([20, 24])
    for flip in (False, True):
        out, valid = transforms.transform_boxes(tf.constant(boxes), tf.constant(scale_yx), tf.constant(offset_yx),
                                                tf.constant(content), tf.constant(flip))
        expected = boxes * [3, 2, 3, 2] - [0, 5, 0, 5]
        expected = np.clip(expected, 0, [24, 20, 24, 20])
        expected_valid = (expected[:, 2] - expected[:, 0] > 0) & (expected[:, 3] - expected[:, 1] > 0)
        if flip:
            expected = np.stack([24 - expected[:, 2], expected[:, 1], 24 - expected[:, 0], expected[:, 3]], axis=1)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)
        assert valid.numpy().tolist() == expected_valid.tolist() == [True, True, False, False]


# ----------------------------------------------------------------------------------------------------
# Whole training examples against a NumPy reference of the documented transform.


def _example(rng, height, width, n):
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    masks = np.zeros((n, height, width), np.uint8)
    boxes = np.zeros((n, 4), np.float32)
    for g in range(n):
        x1, x2 = np.sort(rng.integers(0, width, 2))
        y1, y2 = np.sort(rng.integers(0, height, 2))
        x2, y2 = max(x2, x1 + 2), max(y2, y1 + 2)
        yy, xx = np.mgrid[0:height, 0:width] + 0.5
        # An ellipse inscribed in the box, so the crop has real edges in both directions.
        inside = ((xx - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2 + ((yy - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2 <= 1
        masks[g] = inside
        boxes[g] = [x1, y1, x2, y2]
    boxes = np.clip(boxes, 0, [width, height, width, height])
    labels = rng.integers(1, 6, n).astype(np.int32)
    crowd = np.zeros(n, bool)
    crowd[-1] = True
    parsed = {"image": tf.constant(_png(image)), "image_id": tf.constant(42, tf.int64),
              "objects": {"box": tf.constant(boxes), "label": tf.constant(labels), "is_crowd": tf.constant(crowd),
                          "mask": tf.constant([_png(m) for m in masks])}}
    return parsed, image, masks, boxes, labels, crowd


@pytest.mark.parametrize("image_dtype", ["uint8", "float32"])
def test_train_example_matches_reference(rng, image_dtype):
    height, width, n = 37, 53, 4
    options = InputOptions(canvas_size=(64, 80), scale_jitter=(0.7, 1.6), random_flip=True, max_instances=6,
                           mask_size=14, train_image_dtype=image_dtype)
    parsed, image, masks, boxes, labels, crowd = _example(rng, height, width, n)
    base_scale = min(64 / height, 80 / width)
    seen_flips, seen_crops = set(), False
    for trial in range(64):
        key = tf.constant(rng.integers(0, 2**31, 2), tf.int64)
        out = {k: v.numpy() for k, v in transforms.train_example(parsed, key, options).items()}
        flip = bool(out["flipped"])
        sy, sx = out["image_scale"]
        oy, ox = out["crop_offset"].astype(int)
        ch, cw = out["image_size"]
        size_h, size_w = int(round(sy * height)), int(round(sx * width))
        assert 0.7 * base_scale - 0.05 <= sy <= 1.6 * base_scale + 0.05
        assert (ch, cw) == (min(size_h - oy, 64), min(size_w - ox, 80))
        assert out["original_size"].tolist() == [height, width]

        # Image: resize, crop the window, flip, pad with zeros; normalised (float32) or rounded to pixels (uint8, the
        # step normalises them).
        resized = reference_resize(image.astype(np.float64), size_h, size_w)[oy:oy + ch, ox:ox + cw]
        if flip:
            resized = resized[:, ::-1]
        expected_image = np.zeros((64, 80, 3))
        if image_dtype == "uint8":
            expected_image[:ch, :cw] = np.clip(np.round(resized), 0, 255)
            assert out["image"].dtype == np.uint8
            difference = np.abs(out["image"].astype(np.float64) - expected_image)
            assert difference.max() <= 1 and (difference > 0).mean() < 0.01  # only float ties round apart
        else:
            expected_image[:ch, :cw] = (resized - options.pixel_mean) / options.pixel_std
            assert out["image"].dtype == np.float32
            np.testing.assert_allclose(out["image"], expected_image, atol=1e-3)

        # Boxes.
        expected_boxes = np.clip(boxes * [sx, sy, sx, sy] - [ox, oy, ox, oy], 0, [cw, ch, cw, ch])
        expected_valid = (expected_boxes[:, 2] - expected_boxes[:, 0] > 1e-5) & \
                         (expected_boxes[:, 3] - expected_boxes[:, 1] > 1e-5)
        if flip:
            expected_boxes = np.stack([cw - expected_boxes[:, 2], expected_boxes[:, 1], cw - expected_boxes[:, 0],
                                       expected_boxes[:, 3]], axis=1)
        assert out["gt_valid"].tolist() == expected_valid.tolist() + [False, False]
        np.testing.assert_allclose(out["gt_boxes"][:n][expected_valid], expected_boxes[expected_valid],
                                   rtol=1e-5, atol=1e-4)
        assert out["gt_classes"].tolist() == np.where(expected_valid, labels, 0).tolist() + [0, 0]
        assert out["gt_is_crowd"].tolist() == (expected_valid & crowd).tolist() + [False, False]
        assert not out["gt_boxes"][~out["gt_valid"]].any() and not out["gt_masks"][~out["gt_valid"]].any()

        # Masks: cell (i, j) samples the transformed mask at the canvas point of the convention; mapping that
        # point back through flip, crop and scale gives where to read the original mask.
        for g in np.flatnonzero(expected_valid):
            x1, y1, x2, y2 = out["gt_boxes"][g]
            xs = x1 + (np.arange(14) + 0.5) * (x2 - x1) / 14
            ys = y1 + (np.arange(14) + 0.5) * (y2 - y1) / 14
            if flip:
                xs = cw - xs
            expected_crop = bilinear_sample(masks[g], (xs + ox) / sx, (ys + oy) / sy)
            np.testing.assert_allclose(out["gt_masks"][g], expected_crop, atol=2e-4)
        seen_flips.add(flip)
        seen_crops |= bool(oy or ox)
        if trial >= 8 and len(seen_flips) == 2 and seen_crops:
            break
    assert seen_flips == {False, True} and seen_crops


def test_short_side_resize_and_uint8_masks(rng):
    options = InputOptions(canvas_size=(96, 96), short_side=40, long_side_max=90, random_flip=False,
                           max_instances=3, mask_size=8, mask_dtype="uint8")
    parsed, *_ = _example(rng, 30, 80, 2)  # long side limits: 40/30 * 80 > 90
    out = transforms.train_example(parsed, tf.constant([1, 2], tf.int64), options)
    assert out["image_size"].numpy().tolist() == [round(30 * 90 / 80), 90]
    assert out["gt_masks"].dtype == tf.uint8 and set(np.unique(out["gt_masks"].numpy())) <= {0, 1}
    parsed, *_ = _example(rng, 50, 60, 2)  # short side decides
    out = transforms.train_example(parsed, tf.constant([1, 2], tf.int64), options)
    assert out["image_size"].numpy().tolist() == [40, 48]


def test_decode_image_any_channels_and_depth(rng):
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    deep = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    np.testing.assert_array_equal(transforms.decode_image(_png(gray)).numpy(), np.repeat(gray[..., None], 3, 2))
    np.testing.assert_array_equal(transforms.decode_image(_png(rgba)).numpy(), rgba[..., :3])
    np.testing.assert_array_equal(transforms.decode_image(_png(deep)).numpy(),
                                  np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, 2))


# ----------------------------------------------------------------------------------------------------
# Pipelines on a tiny built dataset.

CONTRACT = {  # key: (shape after the batch axis, dtype)
    "image": ((64, 64, 3), np.uint8), "gt_boxes": ((5, 4), np.float32), "gt_classes": ((5,), np.int32),
    "gt_is_crowd": ((5,), np.bool_), "gt_valid": ((5,), np.bool_), "gt_masks": ((5, 16, 16), np.float32),
    "image_id": ((), np.int64), "original_size": ((2,), np.int32), "image_scale": ((2,), np.float32),
    "image_size": ((2,), np.int32), "crop_offset": ((2,), np.float32), "flipped": ((), np.bool_),
}
OPTIONS = InputOptions(canvas_size=(64, 64), scale_jitter=(0.8, 1.25), max_instances=5, mask_size=16,
                       shuffle_buffer=4)


@pytest.fixture(scope="module")
def tiny_builder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_shapes")
    shape_options = synthetic.ShapesOptions(image_size_range=(48, 72), object_size_range=(12.0, 30.0),
                                            min_visible_area=30.0)
    paths = synthetic.generate(str(root / "coco"), num_train=7, num_val=5, seed=3, options=shape_options)
    return coco_dataset.build({"name": "tiny", "data_dir": str(root / "tfds"), **paths})


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_train_batches_have_fixed_shapes(tiny_builder):
    batches = _take(pipeline.TrainIterator(tiny_builder, OPTIONS, batch_size=2, seed=0), 5)
    for batch in batches:
        assert set(batch) == set(CONTRACT)
        for key, (shape, dtype) in CONTRACT.items():
            assert batch[key].shape == (2,) + shape and batch[key].dtype == dtype, key
        assert (batch["gt_classes"][batch["gt_valid"]] >= 1).all()
        assert (batch["gt_classes"][batch["gt_valid"]] <= 5).all()


def test_resume_reproduces_the_stream(tiny_builder):
    # 7 examples, batch 3: batches straddle epoch boundaries.
    reference = _take(pipeline.TrainIterator(tiny_builder, OPTIONS, batch_size=3, seed=5), 6)
    for start in (2, 4):
        resumed = pipeline.TrainIterator(tiny_builder, OPTIONS, batch_size=3, seed=5, start_batch=start)
        for expected in reference[start:start + 2]:
            got = next(resumed)
            for key in CONTRACT:
                np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
        assert resumed.batches_consumed == start + 2
    other_seed = _take(pipeline.TrainIterator(tiny_builder, OPTIONS, batch_size=3, seed=6), 2)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(reference, other_seed))


def test_epochs_visit_each_example_once_and_shards_are_disjoint(tiny_builder):
    no_jitter = InputOptions(canvas_size=(64, 64), max_instances=5, mask_size=16, shuffle_buffer=7)
    single = _take(pipeline.TrainIterator(tiny_builder, no_jitter, batch_size=7, seed=1), 2)
    epoch_ids = [sorted(b["image_id"].tolist()) for b in single]
    assert epoch_ids[0] == epoch_ids[1] == list(range(1, 8))
    assert single[0]["image_id"].tolist() != single[1]["image_id"].tolist()  # reshuffled per epoch
    shards = [next(pipeline.TrainIterator(tiny_builder, no_jitter, batch_size=3, seed=1, shard_index=i,
                                          shard_count=2))["image_id"].tolist() for i in range(2)]
    assert len(set(shards[0])) == 3 and not set(shards[0]) & set(shards[1])


def test_eval_covers_every_image_once(tiny_builder):
    eval_options = InputOptions(canvas_size=(64, 64), max_instances=5, mask_size=16)
    seen = []
    counts = []
    for shard in range(2):
        dataset, num_batches = pipeline.eval_dataset(tiny_builder, eval_options, batch_size=2, shard_index=shard,
                                                     shard_count=2, with_ground_truth=True)
        batches = list(dataset.as_numpy_iterator())
        counts.append((num_batches, len(batches)))
        for batch in batches:
            assert batch["image"].shape == (2, 64, 64, 3) and batch["gt_masks"].shape == (2, 5, 16, 16)
            valid = batch["example_valid"]
            seen += batch["image_id"][valid].tolist()
            assert (batch["image_id"][~valid] == -1).all()
            # Nothing is cropped in evaluation: the scaled original is the image window.
            np.testing.assert_allclose(batch["original_size"][valid] * batch["image_scale"][valid],
                                       batch["image_size"][valid], atol=1e-3)
            if valid.any():
                assert batch["image_size"][valid].max() == 64  # fit to the canvas
    assert counts == [(2, 2), (2, 2)]
    assert sorted(seen) == [1, 2, 3, 4, 5]


def test_eval_rejects_a_canvas_that_cannot_hold_every_image(tiny_builder):
    with pytest.raises(ValueError, match="cannot hold every evaluation image"):
        pipeline.eval_dataset(tiny_builder, InputOptions(canvas_size=(64, 64), short_side=48, long_side_max=80),
                              batch_size=2)


def test_padded_eval_batches_are_grouped_by_canvas_alike_on_every_shard(tiny_builder):
    """With eval_canvas "padded" every example sits on its own canvas (padded_canvas of its resized size), the
    batches are grouped by canvas, and both shards yield the same sequence of batch shapes (so every step's global
    batch can be assembled), covering every image once. The pixels inside the window are the fixed canvas'."""
    fixed = InputOptions(canvas_size=(64, 64), max_instances=5, mask_size=16, short_side=40, long_side_max=64)
    padded = dataclasses.replace(fixed, eval_canvas="padded", size_divisibility=16)
    reference = {}
    for batch in pipeline.eval_batches(tiny_builder, fixed, batch_size=1, with_ground_truth=True):
        if batch["example_valid"][0]:
            reference[int(batch["image_id"][0])] = {k: v[0] for k, v in batch.items()}
    shapes, seen, counts = [], [], []
    for shard in range(2):
        dataset, num_batches = pipeline.eval_dataset(tiny_builder, padded, batch_size=2, shard_index=shard,
                                                     shard_count=2, with_ground_truth=True)
        batches = list(dataset.as_numpy_iterator())
        counts.append((num_batches, len(batches)))
        shapes.append([batch["image"].shape for batch in batches])
        for batch in batches:
            valid = batch["example_valid"]
            assert (batch["image_id"][~valid] == -1).all() and not batch["image"][~valid].any()
            for i in np.flatnonzero(valid):
                expected = reference[int(batch["image_id"][i])]
                height, width = expected["image_size"]
                canvas = image_resize.padded_canvas((height, width), 16)
                assert batch["image"].shape[1:3] == canvas
                np.testing.assert_array_equal(batch["image_size"][i], expected["image_size"])
                np.testing.assert_array_equal(batch["image"][i, :height, :width], expected["image"][:height, :width])
                assert not batch["image"][i, height:].any() and not batch["image"][i, :, width:].any()
                for key in ("gt_boxes", "gt_masks", "gt_valid", "image_scale", "original_size"):
                    np.testing.assert_array_equal(batch[key][i], expected[key], err_msg=key)
                seen.append(int(batch["image_id"][i]))
    assert shapes[0] == shapes[1] and len(set(shapes[0])) > 1
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1]
    assert sorted(seen) == sorted(reference) == [1, 2, 3, 4, 5]
    # The planned canvases are those of the stored sizes, smallest first.
    plan = pipeline.eval_plan(tiny_builder, padded, batch_size=2, shard_index=0, shard_count=2)
    assert [group.canvas for group in plan] == sorted({tuple(s[1:3]) for s in shapes[0]})


def test_padded_eval_needs_no_canvas_that_holds_every_image(tiny_builder):
    options = InputOptions(canvas_size=(64, 64), short_side=48, long_side_max=80, eval_canvas="padded",
                           size_divisibility=16, eval_canvas_sides=(48, 96))
    dataset, _ = pipeline.eval_dataset(tiny_builder, options, batch_size=2)
    for batch in dataset.as_numpy_iterator():
        assert batch["image"].shape[1:3] in {(48, 96), (96, 48), (48, 48), (96, 96)}
        assert (batch["image_size"][batch["example_valid"]].min(1) == 48).all()


def test_shard_bounds():
    assert [pipeline.shard_bounds(10, i, 3, drop_remainder=True) for i in range(3)] == [(0, 3), (3, 6), (6, 9)]
    assert [pipeline.shard_bounds(10, i, 3, drop_remainder=False) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError):
        pipeline.shard_bounds(10, 3, 3, drop_remainder=True)


# ----------------------------------------------------------------------------------------------------
# Keypoints: the flip swap, the transform against a NumPy reference, and batches from a built dataset.

from maskrcnn_jax.data import keypoints, stick_figures  # noqa: E402


def mirrored_name(name):
    for own, other in (("left_", "right_"), ("right_", "left_")):
        if name.startswith(own):
            return other + name[len(own):]
    return name


def reference_keypoints(points, scale_yx, offset_yx, content_size, flip, names):
    """[n, K, 3] original keypoints -> canvas keypoints by the module doc of transforms, in float32."""
    points = np.asarray(points, np.float32)
    sy, sx = np.float32(scale_yx[0]), np.float32(scale_yx[1])
    x = points[..., 0] * sx - np.float32(offset_yx[1])
    y = points[..., 1] * sy - np.float32(offset_yx[0])
    v = points[..., 2]
    ch, cw = np.float32(content_size[0]), np.float32(content_size[1])
    kept = (v > 0) & (x >= 0) & (x <= cw) & (y >= 0) & (y <= ch)
    if flip:
        x = cw - x
    out = np.where(kept[..., None], np.stack([x, y, v], axis=-1), 0).astype(np.float32)
    if flip:
        out = out[:, [list(names).index(mirrored_name(name)) for name in names]]
    return out


def test_flip_permutation_derives_left_right_pairs_and_takes_explicit_ones():
    names = ["head", "left_hand", "right_hand", "right_foot", "left_foot"]
    assert keypoints.flip_permutation(names) == (0, 2, 1, 4, 3)
    assert keypoints.flip_permutation(["l_eye", "nose", "r_eye"], [("l_eye", "r_eye")]) == (2, 1, 0)
    with pytest.raises(ValueError, match="'left_knee' has no 'right_knee'"):
        keypoints.flip_permutation(["left_knee", "right_hand", "left_hand"])
    with pytest.raises(ValueError, match="'right_knee' has no 'left_knee'"):
        keypoints.flip_permutation(["right_knee"])
    with pytest.raises(ValueError, match="'elbow', which is not a keypoint"):
        keypoints.flip_permutation(names, [("head", "elbow")])
    with pytest.raises(ValueError, match="more than one flip-map pair"):
        keypoints.flip_permutation(names, [("left_hand", "right_hand"), ("left_hand", "left_foot")])


def test_keypoint_flip_map_option_takes_config_lists():
    options = InputOptions.from_config({"keypoint_flip_map": [["l_eye", "r_eye"]]})
    assert options.keypoint_flip_map == (("l_eye", "r_eye"),)
    with pytest.raises(ValueError, match="pairs"):
        InputOptions(keypoint_flip_map=(("a", "b", "c"),))


def test_transform_keypoints_scale_crop_flip_swap():
    names = ("head", "left_hand", "right_hand")
    points = np.asarray([[[2, 3, 2], [5.5, 2.5, 1], [1, 2.4, 2]],     # y = 2.5 lands on the top edge; 2.4 above it
                         [[8, 12.5, 2], [0, 0, 0], [7.9, 9, 1]],    # x = 8 lands on the window's right edge: kept
                         [[8.01, 9, 2], [3, 5, 0], [3, 9, 2]]],     # just right of the window; unlabelled
                        np.float32)
    scale_yx, offset_yx, content = np.float32([2, 3]), np.int32([5, 0]), np.int32([20, 24])
    for flip in (False, True):
        permutation = keypoints.flip_permutation(names)
        out = transforms.transform_keypoints(tf.constant(points), tf.constant(scale_yx), tf.constant(offset_yx),
                                             tf.constant(content), tf.constant(flip), permutation).numpy()
        expected = reference_keypoints(points, scale_yx, offset_yx, content, flip, names)
        np.testing.assert_allclose(out, expected, rtol=1e-6)
        kept = expected[..., 2] > 0
        assert kept.tolist() == ([[True, True, False], [True, False, True], [False, False, True]] if not flip else
                                 [[True, False, True], [True, True, False], [False, True, False]])
        assert not expected[~kept].any()


def _with_keypoints(parsed, rng, boxes, num_keypoints):
    """Adds keypoints to an `_example`: random points in and around each box, some unlabelled or hidden."""
    n = len(boxes)
    x = rng.uniform(boxes[:, None, 0] - 3, boxes[:, None, 2] + 3, (n, num_keypoints))
    y = rng.uniform(boxes[:, None, 1] - 3, boxes[:, None, 3] + 3, (n, num_keypoints))
    v = rng.choice([0, 1, 2], (n, num_keypoints), p=[0.2, 0.2, 0.6]).astype(np.float32)
    points = np.stack([np.where(v > 0, x, 0), np.where(v > 0, y, 0), v], axis=-1).astype(np.float32)
    objects = dict(parsed["objects"], keypoints=tf.constant(points))
    return dict(parsed, objects=objects), points


def test_train_example_keypoints_match_reference(rng):
    height, width, n = 41, 57, 4
    names = ("head", "left_hand", "right_hand", "right_foot", "left_foot")
    options = InputOptions(canvas_size=(64, 80), scale_jitter=(0.7, 1.6), max_instances=6, mask_size=8)
    parsed, _, _, boxes, _, _ = _example(rng, height, width, n)
    # Instance 2 has no box (so it is never valid) but labelled keypoints all over the image, which must go.
    boxes[2] = [0, 0, width, height]
    parsed, points = _with_keypoints(parsed, rng, boxes, len(names))
    boxes[2] = [10, 10, 10, 20]
    points[2, :, 2] = 2
    parsed["objects"].update(box=tf.constant(boxes), keypoints=tf.constant(points))
    permutation = keypoints.flip_permutation(names)
    seen_flips, seen_crops, seen_dropped = set(), False, False
    for trial in range(64):
        key = tf.constant(rng.integers(0, 2**31, 2), tf.int64)
        out = {k: v.numpy() for k, v in transforms.train_example(parsed, key, options, permutation).items()}
        assert out["gt_keypoints"].shape == (6, 5, 3) and out["gt_keypoints"].dtype == np.float32
        flip = bool(out["flipped"])
        expected = reference_keypoints(points, out["image_scale"], out["crop_offset"], out["image_size"], flip, names)
        valid = out["gt_valid"][:n]
        assert not valid[2]
        expected[~valid] = 0
        np.testing.assert_allclose(out["gt_keypoints"][:n], expected, rtol=1e-5, atol=1e-4)
        assert not out["gt_keypoints"][n:].any()  # padding
        seen_flips.add(flip)
        seen_crops |= bool(out["crop_offset"].any())
        seen_dropped |= bool(((points[..., 2] > 0) & (expected[..., 2] == 0) & valid[:, None]).any())
        if trial >= 8 and len(seen_flips) == 2 and seen_crops and seen_dropped:
            break
    assert seen_flips == {False, True} and seen_crops and seen_dropped


def test_keypoint_flip_of_a_dataset(tmp_path):
    class Builder:  # what the pipeline reads of a builder: its metadata
        def __init__(self, names):
            self.info = type("Info", (), {"metadata": {"keypoints": {"names": names}}})()

    assert pipeline._keypoint_flip(Builder(["left_a", "right_a", "b"]), InputOptions()) == (1, 0, 2)
    unpaired = Builder(["left_a", "b"])
    with pytest.raises(ValueError, match="'left_a' has no 'right_a'"):
        pipeline._keypoint_flip(unpaired, InputOptions())
    assert pipeline._keypoint_flip(unpaired, InputOptions(random_flip=False)) == (0, 1)
    assert pipeline._keypoint_flip(unpaired, InputOptions(keypoint_flip_map=(("left_a", "b"),))) == (1, 0)
    no_keypoints = Builder(None)
    no_keypoints.info.metadata = {"keypoints": None}
    assert pipeline._keypoint_flip(no_keypoints, InputOptions()) is None


FIGURE_OPTIONS = InputOptions(canvas_size=(64, 64), scale_jitter=(0.8, 1.5), max_instances=4, mask_size=8,
                              shuffle_buffer=6)


@pytest.fixture(scope="module")
def figures_builder(tmp_path_factory):
    """A tiny built stick-figure dataset and its annotations by image id (crowd regions last, as stored)."""
    root = tmp_path_factory.mktemp("tiny_figures")
    options = stick_figures.StickFigureOptions(image_size_range=(48, 72), figure_height_range=(24.0, 44.0),
                                               crowd_figure_height_range=(10.0, 16.0), empty_fraction=0.2,
                                               crowd_fraction=0.3)
    paths = stick_figures.generate(str(root / "coco"), num_train=6, num_val=3, seed=4, options=options)
    builder = coco_dataset.build({"name": "tiny_figures", "data_dir": str(root / "tfds"), **paths})
    annotations = {}
    for split in ("train", "val"):
        with open(paths[f"{split}_json"]) as f:
            coco = json.load(f)
        by_image = {image["id"]: [] for image in coco["images"]}
        for a in coco["annotations"]:
            by_image[a["image_id"]].append(a)
        annotations[split] = {i: sorted(a, key=lambda a: a["iscrowd"]) for i, a in by_image.items()}
    return builder, annotations


def _expected_boxes_valid(annotations, scale_yx, offset_yx, content_size):
    boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)],
                       np.float32).reshape(-1, 4)
    sy, sx = scale_yx
    oy, ox = offset_yx
    ch, cw = content_size
    boxes = np.clip(boxes * [sx, sy, sx, sy] - [ox, oy, ox, oy], 0, [cw, ch, cw, ch])
    return (boxes[:, 2] - boxes[:, 0] > 1e-5) & (boxes[:, 3] - boxes[:, 1] > 1e-5)


def test_keypoints_survive_build_to_train_batches(figures_builder):
    builder, annotations = figures_builder
    names = stick_figures.JOINT_NAMES
    schema = coco_dataset.load_keypoint_schema(builder)
    assert schema.names == names and schema.oks_sigmas == pytest.approx(stick_figures.OKS_SIGMAS)
    iterator = pipeline.TrainIterator(builder, FIGURE_OPTIONS, batch_size=2, seed=0)
    seen_flips, seen_crops, labelled = set(), False, 0
    for _ in range(9):
        batch = next(iterator)
        assert batch["gt_keypoints"].shape == (2, 4, len(names), 3) and batch["gt_keypoints"].dtype == np.float32
        for b in range(2):
            objects = annotations["train"][int(batch["image_id"][b])][:4]
            points = np.asarray([a["keypoints"] for a in objects], np.float32).reshape(-1, len(names), 3)
            args = (batch["image_scale"][b], batch["crop_offset"][b], batch["image_size"][b])
            expected = reference_keypoints(points, *args, bool(batch["flipped"][b]), names)
            valid = _expected_boxes_valid(objects, *args)
            assert batch["gt_valid"][b, :len(objects)].tolist() == valid.tolist()
            expected[~valid] = 0
            np.testing.assert_allclose(batch["gt_keypoints"][b, :len(objects)], expected, rtol=1e-5, atol=1e-4)
            assert not batch["gt_keypoints"][b, len(objects):].any()
            labelled += int((expected[..., 2] > 0).sum())
            seen_flips.add(bool(batch["flipped"][b]))
            seen_crops |= bool(batch["crop_offset"][b].any())
    assert seen_flips == {False, True} and seen_crops and labelled > 50


def test_keypoints_in_eval_batches(figures_builder):
    builder, annotations = figures_builder
    options = InputOptions(canvas_size=(64, 64), max_instances=4, mask_size=8)
    batches = list(pipeline.eval_batches(builder, options, batch_size=2, with_ground_truth=True))
    assert len(batches) == 2
    for batch in batches:
        assert batch["gt_keypoints"].shape == (2, 4, len(stick_figures.JOINT_NAMES), 3)
        for b in range(2):
            if not batch["example_valid"][b]:
                assert not batch["gt_keypoints"][b].any()
                continue
            objects = annotations["val"][int(batch["image_id"][b])][:4]
            points = np.asarray([a["keypoints"] for a in objects], np.float32).reshape(-1, 13, 3)
            expected = reference_keypoints(points, batch["image_scale"][b], (0, 0), batch["image_size"][b], False,
                                           stick_figures.JOINT_NAMES)
            np.testing.assert_allclose(batch["gt_keypoints"][b, :len(objects)], expected, rtol=1e-5, atol=1e-4)
    without = next(pipeline.eval_batches(builder, options, batch_size=2))
    assert not any(key.startswith("gt_") for key in without)


def test_a_dataset_without_keypoints_has_no_gt_keypoints(tiny_builder):
    assert coco_dataset.load_keypoint_schema(tiny_builder) is None
    batch = next(pipeline.TrainIterator(tiny_builder, OPTIONS, batch_size=2, seed=0))
    assert "gt_keypoints" not in batch
    eval_batch = next(pipeline.eval_batches(tiny_builder, OPTIONS, batch_size=2, with_ground_truth=True))
    assert "gt_keypoints" not in eval_batch and "gt_masks" in eval_batch
