"""Predictor, maskrcnn-predict and the exported model, on a checkpoint the module trains itself (configs/test.py on
a 64 px canvas, a few steps: enough for real detections with real masks at score threshold 0)."""

import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from maskrcnn_jax import ops, predict, train
from maskrcnn_jax.data import image_resize, pipeline, transforms
from maskrcnn_jax.engine import checkpointing, workdir as workdir_lib
from maskrcnn_jax.serving import host as inference_io
from maskrcnn_jax.serving.export import export_predictor
from maskrcnn_jax.serving.exported_model import ExportedModel
from maskrcnn_jax.serving.predictor import Predictor
from tiny_training import tiny_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    config = tiny_config(str(root / "data"), num_steps=4, checkpoint_every=2)
    config.train.final_eval = True
    train.train_and_evaluate(config, str(root / "run"))
    return str(root / "run")


@pytest.fixture(scope="module")
def predictor(workdir):
    return Predictor.from_checkpoint(workdir)


def photo(rng, height, width, channels=3):
    """A smooth random image (a bilinear upsampling of coarse noise), so that resampling errors stay small."""
    coarse = rng.uniform(0, 255, (4, 4, channels)).astype(np.float32)
    image = inference_io.resize_bilinear(coarse, (height, width))
    return np.clip(image, 0, 255).astype(np.uint8)


def assert_results_equal(a, b):
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-4)
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-6)
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert a["names"] == b["names"]
    assert (a["masks"] != b["masks"]).mean() < 1e-4


# ----------------------------------------------------------------------------------------------------
# Host-side preparation against the evaluation pipeline and ops.paste_masks.


@pytest.mark.parametrize("eval_canvas", ["fixed", "padded"])
@pytest.mark.parametrize("rounding", ["round", "floor"])
@pytest.mark.parametrize("short_side", [None, 48])
def test_prepared_canvas_equals_the_eval_pipeline(rng, rounding, short_side, eval_canvas):
    """The host's canvas equals the evaluation pipeline's, to the pixel: the same resized window and, with padded
    canvases, the same canvas, the one pipeline.eval_geometry plans the example's batch on."""
    options = transforms.InputOptions(canvas_size=(96, 112), short_side=short_side,
                                      long_side_max=None if short_side is None else 90, size_rounding=rounding,
                                      eval_canvas=eval_canvas, size_divisibility=16)
    spec = inference_io.InferenceSpec((96, 112), options.short_side, options.long_side_max, rounding,
                                      options.pixel_mean, options.pixel_std, 0.5, "detectron2", 1, (1,), ("thing",),
                                      eval_canvas=eval_canvas, size_divisibility=16)
    canvases = set()
    for height, width in [(37, 101), (300, 211), (15, 12), (200, 70)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        encoded = io.BytesIO()
        Image.fromarray(image).save(encoded, format="PNG")
        (size,), (canvas,) = pipeline.eval_geometry(np.asarray([[height, width]]), options)
        expected = transforms.eval_example({"image": encoded.getvalue(), "image_id": 1}, options, False,
                                           canvas_size=tuple(canvas), size=size)
        prepared = inference_io.prepare_image(image, spec)
        assert prepared.image_size == tuple(expected["image_size"].numpy())
        assert prepared.canvas.shape[:2] == tuple(canvas)
        np.testing.assert_allclose(prepared.canvas, expected["image"].numpy(), atol=2e-5)
        canvases.add(tuple(canvas))
        if eval_canvas == "padded":
            assert all(side % 16 == 0 for side in canvas)
            assert all(0 <= c - s < 16 for c, s in zip(canvas, prepared.image_size))
    if eval_canvas == "fixed":
        assert canvases == {(96, 112)}
    else:
        assert len(canvases) >= 3


def test_paste_masks_equals_ops_paste_masks(rng):
    height, width = 70, 90
    masks = rng.uniform(0, 1, (12, 28, 28)).astype(np.float32)
    x1, y1 = rng.uniform(-20, 80, 12), rng.uniform(-20, 60, 12)
    boxes = np.stack([x1, y1, x1 + rng.uniform(0.5, 60, 12), y1 + rng.uniform(0.5, 40, 12)], 1).astype(np.float32)
    boxes[0, 2] = boxes[0, 0]  # a degenerate box pastes nothing
    ours = inference_io.paste_masks(masks, boxes, height, width, 0.5)
    reference = np.asarray(ops.paste_masks(jnp.asarray(masks), jnp.asarray(boxes), (height, width)))
    probabilities = np.asarray(ops.paste_mask_probabilities(jnp.asarray(masks), jnp.asarray(boxes), (height, width)))
    decided = np.abs(probabilities - 0.5) > 1e-5  # float32 summation order may flip exact ties
    np.testing.assert_array_equal(ours[decided], reference[decided])
    assert ours.sum() > 1000 and not ours[0].any()


def test_torchvision_paste_rule_equals_torchvisions_paste_masks_in_image(rng):
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    height, width = 70, 90
    masks = rng.uniform(0, 1, (12, 28, 28)).astype(np.float32)
    x1, y1 = rng.uniform(-20, 80, 12), rng.uniform(-20, 60, 12)
    boxes = np.stack([x1, y1, x1 + rng.uniform(0.5, 60, 12), y1 + rng.uniform(0.5, 40, 12)], 1).astype(np.float32)
    ours = inference_io.paste_masks(masks, boxes, height, width, 0.5, rule="torchvision")
    probabilities = paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes),
                                         (height, width))[:, 0].numpy()
    decided = np.abs(probabilities - 0.5) > 1e-5
    np.testing.assert_array_equal(ours[decided], probabilities[decided] > 0.5)
    assert ours.sum() > 1000


def test_images_that_are_not_8_or_16_bit_arrays_are_refused():
    for bad in [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4, 3), np.uint8)]:
        with pytest.raises(ValueError):
            inference_io.as_rgb_uint8(bad)
    gray16 = np.full((2, 2), 0xABCD, np.uint16)
    np.testing.assert_array_equal(inference_io.as_rgb_uint8(gray16), np.full((2, 2, 3), 0xAB, np.uint8))


# ----------------------------------------------------------------------------------------------------
# The Predictor.


def test_any_size_gray_and_rgba_give_results_in_original_pixels(predictor, rng):
    images = [photo(rng, 40, 50), photo(rng, 3000, 4000), photo(rng, 120, 90)[..., 0],
              photo(rng, 90, 120, channels=4)]
    results = predictor(images, score_threshold=0.0)
    assert len(results) == len(images)
    for image, result in zip(images, results):
        height, width = image.shape[:2]
        count = len(result["scores"])
        assert count > 0
        assert result["boxes"].shape == (count, 4) and result["masks"].shape == (count, height, width)
        assert result["masks"].dtype == bool and result["masks"].any()
        assert len(result["names"]) == count and set(result["names"]) <= set(predictor.categories.names)
        assert set(result["labels"].tolist()) <= set(predictor.categories.category_ids)
        assert np.all(np.diff(result["scores"]) <= 0)
        boxes = result["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        for mask, (x1, y1, x2, y2) in zip(result["masks"], boxes):  # masks never leave their box
            rows, columns = np.nonzero(mask)
            if len(rows):
                assert rows.min() >= np.floor(y1) and rows.max() < np.ceil(y2)
                assert columns.min() >= np.floor(x1) and columns.max() < np.ceil(x2)
    # RGBA is its RGB, gray its repetition.
    assert_results_equal(results[3], predictor(np.ascontiguousarray(images[3][..., :3]), score_threshold=0.0))
    assert_results_equal(results[2], predictor(np.repeat(images[2][..., None], 3, -1), score_threshold=0.0))


def test_a_batch_gives_each_image_its_own_result(workdir, predictor, rng):
    images = [photo(rng, 64, 64), photo(rng, 30, 70), photo(rng, 100, 40)]
    batched = Predictor(predictor.config, predictor.variables, predictor.categories, batch_size=2)
    for alone, together in zip([predictor(image, score_threshold=0.0) for image in images],
                               batched(images, score_threshold=0.0)):
        assert_results_equal(alone, together)


def test_score_threshold_only_filters(predictor, rng):
    image = photo(rng, 64, 64)
    everything = predictor(image, score_threshold=0.0)
    threshold = float(np.median(everything["scores"]))
    kept = predictor(image, score_threshold=threshold)
    selected = everything["scores"] >= threshold
    assert 0 < len(kept["scores"]) < len(everything["scores"])
    np.testing.assert_array_equal(kept["scores"], everything["scores"][selected])
    np.testing.assert_array_equal(kept["masks"], everything["masks"][selected])


def fake_network(calls):
    """A run_batch without a network: one detection per image whose box is the image's window and whose score
    encodes the window's height and width, so a result shows which image it came from. Records each batch's shape
    and window sizes in `calls`."""

    def run_batch(canvases, image_sizes):
        calls.append((canvases.shape, image_sizes.tolist()))
        batch = len(canvases)
        boxes = np.zeros((batch, 2, 4), np.float32)
        boxes[:, 0, 2], boxes[:, 0, 3] = image_sizes[:, 1], image_sizes[:, 0]
        scores = np.zeros((batch, 2), np.float32)
        scores[:, 0] = (image_sizes[:, 0] * 1000 + image_sizes[:, 1]) / 1e6
        return {"boxes": boxes, "scores": scores, "classes": np.ones((batch, 2), np.int32),
                "masks": np.ones((batch, 2, 4, 4), np.float32), "valid": np.asarray([[True, False]] * batch)}

    return run_batch


def test_images_are_grouped_by_canvas_and_returned_in_input_order():
    spec = inference_io.InferenceSpec((64, 64), 32, 64, "round", (0.0,) * 3, (1.0,) * 3, 0.5, "detectron2", 2,
                                      (1,), ("thing",), eval_canvas="padded", size_divisibility=32)
    # Resized (short side 32, long side <= 64) to 32 x 48, 48 x 32 or 32 x 32: canvases (32, 64), (64, 32), (32, 32).
    sizes = [(20, 30), (30, 20), (40, 40), (20, 30), (30, 20), (10, 15), (50, 50), (60, 40), (33, 33)]
    images = [np.zeros((h, w, 3), np.uint8) for h, w in sizes]
    calls = []
    results = list(inference_io.predict_images(images, fake_network(calls), spec, 0.0))
    assert len(results) == len(images)
    for (height, width), result in zip(sizes, results):  # each result is its own image's, in input order
        assert result["masks"].shape[1:] == (height, width)
        np.testing.assert_allclose(result["boxes"][0], [0, 0, width, height], rtol=1e-6)
    # Every batch has one canvas, holding the windows of that canvas only; partial groups ran filled up.
    for shape, windows in calls:
        assert shape[0] == 2
        assert {spec.canvas_for(w) for w in windows} == {shape[1:3]}
    assert sorted(shape[1:3] for shape, _ in calls) == [(32, 32), (32, 32), (32, 64), (32, 64), (64, 32),
                                                        (64, 32)]
    # A window of 3 images: the oldest waiting image's group runs, filled up, before the next image is read.
    calls.clear()
    seen = []

    def stream():
        for image in images:
            seen.append(len(calls))
            yield image

    window_results = list(inference_io.predict_images(stream(), fake_network(calls), spec, 0.0, window=3))
    assert [r["boxes"].tolist() for r in window_results] == [r["boxes"].tolist() for r in results]
    assert seen[3] >= 1  # image 0 (canvas (32, 64)) could not wait for image 3 of its canvas
    assert len(calls) > 6


@pytest.fixture(scope="module")
def padded_predictor(predictor):
    """The tiny model on padded canvases: short side 32, long side <= 64, canvases multiples of 32."""
    config = predictor.config.copy_and_resolve_references()
    config.data.eval_canvas = "padded"
    config.data.short_side, config.data.long_side_max = 32, 64
    return Predictor(config, predictor.variables, predictor.categories)


def test_padded_canvases_compile_once_each_and_batches_equal_single_images(padded_predictor, rng):
    images = [photo(rng, 60, 90), photo(rng, 90, 60), photo(rng, 64, 64), photo(rng, 40, 62), photo(rng, 91, 59)]
    alone = [padded_predictor(image, score_threshold=0.0) for image in images]
    assert sorted(padded_predictor.compiled_shapes) == [(1, 32, 32, 3), (1, 32, 64, 3), (1, 64, 32, 3)]
    batched = Predictor(padded_predictor.config, padded_predictor.variables, padded_predictor.categories,
                        batch_size=2)
    for expected, actual in zip(alone, batched(images, score_threshold=0.0)):
        assert_results_equal(expected, actual)
    assert sorted(batched.compiled_shapes) == [(2, 32, 32, 3), (2, 32, 64, 3), (2, 64, 32, 3)]
    # Each image ran on its own canvas: the network on that canvas, called directly, gives the same detections.
    prepared = inference_io.prepare_image(images[0], padded_predictor.spec)
    assert prepared.canvas.shape == (32, 64, 3)
    outputs = padded_predictor.run_batch(prepared.canvas[None], np.asarray([prepared.image_size], np.int32))
    direct = inference_io.image_results({k: v[0] for k, v in outputs.items()}, prepared, padded_predictor.spec, 0.0)
    assert_results_equal(direct, alone[0])


def test_canvas_sides_bound_the_compiles(padded_predictor, rng):
    config = padded_predictor.config.copy_and_resolve_references()
    config.data.eval_canvas_sides = (64,)
    bucketed = Predictor(config, padded_predictor.variables, padded_predictor.categories)
    images = [photo(rng, 60, 90), photo(rng, 90, 60), photo(rng, 64, 64), photo(rng, 20, 70)]
    results = bucketed(images, score_threshold=0.0)
    assert bucketed.compiled_shapes == [(1, 64, 64, 3)]
    assert all(len(r["scores"]) > 0 for r in results)


def test_the_exported_padded_model_matches_the_predictor(padded_predictor, tmp_path, rng):
    with pytest.raises(ValueError, match="canvases"):
        export_predictor(padded_predictor, str(tmp_path / "unnamed"))
    out = export_predictor(padded_predictor, str(tmp_path / "exported"), canvases=[(32, 64), (64, 32), (64, 64)])
    loaded = ExportedModel(out)
    assert loaded.spec == padded_predictor.spec and loaded.canvases == [(32, 64), (64, 32), (64, 64)]
    images = [photo(rng, 60, 90), photo(rng, 90, 60)]
    for expected, actual in zip(padded_predictor(images, score_threshold=0.0), loaded(images, score_threshold=0.0)):
        assert_results_equal(expected, actual)
    # A canvas that was not exported (32 x 32) runs on the smallest exported one holding it, and says so.
    with pytest.warns(UserWarning, match=r"canvas \(32, 32\) was not exported: running on \(32, 64\)"):
        result = loaded(photo(rng, 64, 64), score_threshold=0.0)
    assert result["masks"].shape[1:] == (64, 64)
    # Every pair of eval_canvas_sides by default; a second export into the directory replaces the first's functions.
    config = padded_predictor.config.copy_and_resolve_references()
    config.data.eval_canvas_sides = (32, 64)
    export_predictor(Predictor(config, padded_predictor.variables, padded_predictor.categories), out)
    assert ExportedModel(out).canvases == [(32, 32), (32, 64), (64, 32), (64, 64)]


def test_padded_evaluation_equals_the_padded_predictor(workdir, padded_predictor, tmp_path):
    """Evaluation on padded canvases (grouped by canvas in the pipeline, through train.make_predict_fn) gives each
    image the Predictor's detections, so an imported model's AP is the AP of the peer's own predictions."""
    import functools

    import jax
    import tensorflow as tf

    from maskrcnn_jax.engine import datasets, parallel
    from maskrcnn_jax.evaluation import coco
    from maskrcnn_jax.evaluation.evaluator import CocoEvaluator

    config = padded_predictor.config
    builder, sources = datasets.prepare_dataset(config)
    evaluator = CocoEvaluator(config, builder, sources, padded_predictor.categories, str(tmp_path))
    predict = functools.partial(train.make_predict_fn(padded_predictor.model, parallel.make_mesh(jax.devices()[:1])),
                                padded_predictor.variables)
    files = {image["id"]: image["file_name"] for image in evaluator.coco_gt().dataset["images"]}
    images_dir = sources.get("val_images") or evaluator._built_images_dir()
    count = 0
    for prediction, meta in evaluator.local_predictions(predict):
        _, detections = coco.detections_to_results(prediction, meta["image_id"], meta["image_size"],
                                                   meta["original_size"], evaluator.spec)
        # The pipeline's own decoder, so that both sides start from the same pixels.
        pixels = tf.io.decode_image(tf.io.read_file(os.path.join(images_dir, files[meta["image_id"]])),
                                    channels=3).numpy()
        expected = padded_predictor(pixels, score_threshold=0.0)
        order = np.argsort(-detections["scores"], kind="stable")
        np.testing.assert_allclose(detections["boxes"][order], expected["boxes"], atol=1e-3)
        np.testing.assert_allclose(detections["scores"][order], expected["scores"], atol=1e-5)
        np.testing.assert_array_equal(detections["labels"][order], expected["labels"])
        masks = inference_io.full_masks(detections["mask_crops"], *meta["original_size"])
        assert (masks[order] != expected["masks"]).mean() < 1e-3
        count += 1
    assert count == len(files)


def test_from_checkpoint_takes_the_best_evaluated_step(workdir, tmp_path):
    config = workdir_lib.read_config(workdir)
    manager = checkpointing.checkpoint_manager(workdir, config)
    try:
        available = sorted(manager.all_steps())
    finally:
        manager.close()
    assert available == [2, 4]
    assert workdir_lib.best_step(workdir, available, latest=4) == 4  # only step 4 was evaluated
    assert checkpointing.restore_variables(workdir, config)[1] == 4
    metrics_file = os.path.join(workdir, workdir_lib.METRICS_FILE)
    original = open(metrics_file).read()
    try:
        with open(metrics_file, "a") as f:
            f.write(json.dumps({"step": 2, workdir_lib.BEST_METRIC: 2.0}) + "\n")
        assert workdir_lib.best_step(workdir, available, latest=4) == 2
        assert checkpointing.restore_variables(workdir, config)[1] == 2
    finally:
        with open(metrics_file, "w") as f:
            f.write(original)


# ----------------------------------------------------------------------------------------------------
# Export.


def test_the_exported_model_matches_the_predictor(predictor, tmp_path, rng):
    out = export_predictor(predictor, str(tmp_path / "exported"))
    loaded = ExportedModel(out)
    assert loaded.spec == predictor.spec
    images = [photo(rng, 64, 64), photo(rng, 200, 150, channels=4)]
    for expected, actual in zip(predictor(images, score_threshold=0.0), loaded(images, score_threshold=0.0)):
        assert_results_equal(expected, actual)


def test_the_exported_model_runs_from_five_copied_files_without_the_package(predictor, tmp_path, rng):
    """serving/exported_model.py, serving/host.py, serving/keypoints.py, data/image_resize.py and
    layers/compile_options.py, copied next to a server, run an export with the package made unimportable, and give
    the Predictor's results."""
    import shutil
    import subprocess
    import sys

    from maskrcnn_jax.data import image_resize
    from maskrcnn_jax.layers import compile_options
    from maskrcnn_jax.serving import exported_model, keypoints

    out = export_predictor(predictor, str(tmp_path / "exported"))
    server = tmp_path / "server"
    server.mkdir()
    for module in (exported_model, inference_io, image_resize, keypoints, compile_options):
        shutil.copy(module.__file__, server)
    image = photo(rng, 90, 70)
    np.save(tmp_path / "image.npy", image)
    script = (
        "import sys, pickle\n"
        "sys.modules['maskrcnn_jax'] = None  # the package is not there\n"
        f"sys.path.insert(0, {str(server)!r})\n"
        "import numpy as np\n"
        "from exported_model import ExportedModel\n"
        f"result = ExportedModel({out!r})(np.load({str(tmp_path / 'image.npy')!r}), score_threshold=0.0)\n"
        f"pickle.dump(result, open({str(tmp_path / 'result.pkl')!r}, 'wb'))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    import pickle

    with open(tmp_path / "result.pkl", "rb") as f:
        assert_results_equal(predictor(image, score_threshold=0.0), pickle.load(f))


# ----------------------------------------------------------------------------------------------------
# maskrcnn-predict.


def overlay_regions(result, height, width):
    """(mask interiors away from every box outline and label, pixels far from every box and label)."""
    near_drawing = np.zeros((height, width), bool)
    for (x1, y1, x2, y2), name in zip(result["boxes"], result["names"]):
        text_right = x1 + 2 + 8 * (len(name) + 5)
        near_drawing[max(int(y1) - 14, 0):int(np.ceil(y2)) + 3, max(int(x1) - 3, 0):int(max(x2, text_right)) + 4] = True
    outlines = np.zeros((height, width), bool)
    for (x1, y1, x2, y2) in result["boxes"]:
        outlines[max(int(y1) - 14, 0):int(y1) + 3, max(int(x1) - 3, 0):] = True  # box top and its label
        for x in (x1, x2):
            outlines[max(int(y1) - 2, 0):int(y2) + 3, max(int(x) - 2, 0):int(x) + 3] = True
        outlines[max(int(y2) - 2, 0):int(y2) + 3, max(int(x1) - 2, 0):int(x2) + 3] = True
    tinted = result["masks"].any(0) & ~outlines
    return tinted, ~near_drawing


def test_predict_cli_writes_overlays_and_a_coco_results_json(workdir, predictor, tmp_path, rng):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pictures = {"plain.png": photo(rng, 96, 128), "gray.png": photo(rng, 80, 80)[..., 0],
                "rgba.png": photo(rng, 70, 90, channels=4)}
    for name, pixels in pictures.items():
        Image.fromarray(pixels).save(inputs / name)
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    paths = [str(inputs / n) for n in ["plain.png", "broken.jpg", "gray.png", "rgba.png"]]
    out = tmp_path / "out"

    assert predict.main(["--workdir", workdir, "--out", str(out), "--score-threshold", "0", "--polygons"] + paths) == 0

    assert sorted(os.listdir(out)) == ["gray.png", "images.json", "plain.png", "results.json", "rgba.png"]
    coco = COCO(str(out / "images.json"))
    detections = coco.loadRes(str(out / "results.json"))
    assert sorted(coco.getImgIds()) == [1, 3, 4]  # the broken file keeps its position and is left out
    assert len(detections.getAnnIds()) > 0
    for entry in json.load(open(out / "results.json")):
        assert entry["polygons"] and all(len(p) >= 6 and len(p) % 2 == 0 for p in entry["polygons"])

    # Pixel statistics of the overlay of plain.png: tinted inside the predicted masks, untouched away from them.
    original = pictures["plain.png"]
    overlay = np.asarray(Image.open(out / "plain.png").convert("RGB"))
    result = predictor(original, score_threshold=0.0)
    tinted, untouched = overlay_regions(result, *original.shape[:2])
    assert tinted.sum() > 20 and untouched.sum() > 20
    changed = np.any(overlay != original, axis=-1)
    assert changed[tinted].mean() > 0.95
    assert not changed[untouched].any()


def test_mask_polygons_trace_the_mask():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True  # a 3 x 6 rectangle: x from 3 to 9, y from 2 to 5 in continuous coordinates
    (polygon,) = predict.mask_polygons(mask)
    points = np.asarray(polygon).reshape(-1, 2)
    np.testing.assert_allclose(points.min(0), [3, 2], atol=0.5)
    np.testing.assert_allclose(points.max(0), [9, 5], atol=0.5)


def test_matterport_paste_rule_equals_the_seed_documents_unmold_mask(rng):
    """eval.mask_paste="matterport" against the seed document's unmold_mask written with scikit-image itself: the
    box rounded to whole pixels, skimage.transform.resize(mask, (h, w), order=1, mode="constant", cval=0, clip=True,
    preserve_range=False, anti_aliasing=False), binarised at 0.5."""
    transform = pytest.importorskip("skimage.transform")
    height, width = 70, 90
    masks = rng.uniform(0, 1, (12, 28, 28)).astype(np.float32)
    # A grid above 0.5 everywhere: skimage clips the zero-blended border back up to its minimum, so it stays in.
    masks[3] = rng.uniform(0.6, 0.9, (28, 28))
    x1, y1 = rng.uniform(-20, 80, 12), rng.uniform(-20, 60, 12)
    boxes = np.stack([x1, y1, x1 + rng.uniform(0.5, 60, 12), y1 + rng.uniform(0.5, 40, 12)], 1).astype(np.float32)
    boxes[3] = (10.3, 5.6, 80.2, 63.9)  # larger than the grid, inside the image: its border blends with the zeros
    ours = inference_io.paste_masks(masks, boxes, height, width, 0.5, rule="matterport")

    def unmold_mask(mask, box):
        """(the pasted mask, the pixels whose value is not an exact 0.5 tie that float32 and float64 may split)."""
        x1, y1, x2, y2 = np.round(box).astype(int)
        expected, known = np.zeros((height, width), bool), np.ones((height, width), bool)
        top, left, bottom, right = max(y1, 0), max(x1, 0), min(y2, height), min(x2, width)
        if y2 <= y1 or x2 <= x1 or top >= bottom or left >= right:
            return expected, known
        resized = transform.resize(mask, (y2 - y1, x2 - x1), order=1, mode="constant", cval=0, clip=True,
                                   preserve_range=False, anti_aliasing=False)
        window = (slice(top - y1, bottom - y1), slice(left - x1, right - x1))
        expected[top:bottom, left:right] = (resized >= 0.5)[window]
        known[top:bottom, left:right] = (np.abs(resized - 0.5) > 1e-5)[window]
        return expected, known

    for mask, box, got in zip(masks, boxes, ours):
        expected, known = unmold_mask(mask, box)
        np.testing.assert_array_equal(got[known], expected[known])
    assert ours.sum() > 1000 and ours[3][6:64, 10:80].all()  # border rows included, as skimage's clip keeps them
