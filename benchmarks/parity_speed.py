"""Parity and inference time on photographs: torchvision's `model([image])` against our `Predictor(image)` with its
converted weights and configs/torchvision_maskrcnn_r50_fpn.py as it is (padded canvases, as torchvision pads), on
the photographs tests/test_convert_torchvision.py uses (grace_hopper and scikit-image's rocket, a small chelsea crop,
coffee enlarged 3x and a portrait astronaut crop).

    .venv/bin/python benchmarks/parity_speed.py [--repeats=3] [--stream=20]           # prints the tables
    .venv/bin/python benchmarks/parity_speed.py --write                                # and rewrites RESULTS.md's section

Both sides run batch 1, float32, eval mode, on the uint8 photograph: resize, normalise, pad, network, boxes mapped
back, masks pasted. Tables:
  * per photograph: the agreement of the top 50 detections (labels, largest score and box differences, median and
    smallest mask IoU), our first call (which compiles the network when the photograph's canvas is new), and the
    steady state of each side: medians of --repeats calls after one warm-up, the two sides called in turns;
  * grace_hopper on the fixed 1344 x 1344 canvas (data.eval_canvas=fixed), the single-compile alternative;
  * a stream of --stream photographs of mixed sizes (random crops and rescalings of the five), run once through a
    fresh Predictor with exact padding and once with the sides bucketed to (800, 1088, 1344): the compiles, distinct
    canvases and the wall time of the whole stream, compiles included.
Random weights with randomised BatchNorm statistics (as in the parity test) make the detections real ones (100,
scores near 1), so both sides do the full amount of work.
"""

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from timing import head_commit, machine_line, write_section  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
BUCKET_SIDES = (800, 1088, 1344)


def load_test_module():
    """The parity tests' photographs, randomisation and comparison (tests/torchvision_reference.py), so both measure
    the very same model and input."""
    sys.path.insert(0, str(REPO / "tests"))
    import torchvision_reference

    return torchvision_reference


def mixed_stream(photos, count, seed=0):
    """`count` photographs of mixed sizes: random crops (aspect 0.5 to 2) of the photographs, rescaled by 0.5 to 3."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    bases = list(photos.values())
    stream = []
    for k in range(count):
        base = bases[k % len(bases)]
        height, width = base.shape[:2]
        crop_h = int(rng.uniform(0.4, 1.0) * height)
        crop_w = int(min(width, max(16, crop_h * rng.uniform(0.5, 2.0))))
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        crop = base[top:top + crop_h, left:left + crop_w]
        scale = rng.uniform(0.5, 3.0)
        size = (max(16, int(crop_w * scale)), max(16, int(crop_h * scale)))
        stream.append(np.asarray(Image.fromarray(crop).resize(size, Image.BILINEAR)))
    return stream


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="rewrite the parity_speed section of RESULTS.md")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream", type=int, default=20, help="photographs in the mixed-size stream")
    args = parser.parse_args()

    import torch
    import torchvision

    from maskrcnn_jax.convert import from_torchvision
    from maskrcnn_jax.convert.coco_categories import coco_category_map
    from maskrcnn_jax.convert.configs import default_config
    from maskrcnn_jax.inference import Predictor

    parity = load_test_module()
    torch.manual_seed(0)
    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    parity.randomize_torchvision_model(torch, reference)
    config = default_config("torchvision")
    variables = from_torchvision(reference.state_dict())
    categories = coco_category_map(config.model.num_classes)

    def predictor_for(**data):
        c = config.copy_and_resolve_references()
        for key, value in data.items():
            setattr(c.data, key, value)
        return Predictor(c, variables, categories)

    def torch_predict(photo):
        with torch.no_grad():
            return reference([torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255])[0]

    photos = parity.photographs()
    predictor = predictor_for()
    rows = []
    for name, photo in photos.items():
        expected = {k: v.numpy() for k, v in torch_predict(photo).items()}  # also torchvision's warm-up
        start = time.perf_counter()
        actual = predictor(photo, score_threshold=0.0)
        first = time.perf_counter() - start
        torch_seconds, ours = alternating_medians(lambda: torch_predict(photo),
                                                  lambda: predictor(photo, score_threshold=0.0), args.repeats)
        stats = parity.compare_detections(expected, actual)
        canvas = predictor.canvas_for(_resized(predictor, photo))
        rows.append((name, photo.shape[:2], canvas, stats, torch_seconds, first, ours))
        print(name, photo.shape[:2], canvas, stats, f"torchvision {torch_seconds:.2f}s ours first {first:.2f}s "
              f"steady {ours:.2f}s", flush=True)

    fixed = predictor_for(eval_canvas="fixed")
    grace = photos["grace_hopper"]
    start = time.perf_counter()
    fixed_result = fixed(grace, score_threshold=0.0)
    fixed_first = time.perf_counter() - start
    grace_torch, fixed_steady = alternating_medians(lambda: torch_predict(grace),
                                                    lambda: fixed(grace, score_threshold=0.0), args.repeats)
    fixed_stats = parity.compare_detections({k: v.numpy() for k, v in torch_predict(grace).items()}, fixed_result)
    print("fixed canvas", fixed_stats, fixed_first, fixed_steady, flush=True)

    stream = mixed_stream(photos, args.stream)
    stream_rows = []
    for label, kwargs in [("exact padding to 32 (the config)", {}),
                          (f"sides bucketed to {BUCKET_SIDES}", {"eval_canvas_sides": BUCKET_SIDES})]:
        streamed = predictor_for(**kwargs)
        canvases = {streamed.canvas_for(_resized(streamed, image)) for image in stream}
        start = time.perf_counter()
        for _ in streamed.predict_iter(stream, score_threshold=0.0):
            pass
        seconds = time.perf_counter() - start
        stream_rows.append((label, len(streamed.compiled_shapes), len(canvases), seconds))
        print(label, stream_rows[-1], flush=True)
    sizes = sorted({image.shape[:2] for image in stream})

    lines = [
        "## Parity and speed on photographs: torchvision maskrcnn_resnet50_fpn vs ours with converted weights",
        "",
        f"Command: `.venv/bin/python benchmarks/parity_speed.py --repeats={args.repeats} --stream={args.stream}` at "
        f"commit {head_commit()}, on {machine_line()}.",
        "Both sides on the uint8 photograph (resize, normalise, pad, network, boxes mapped back, masks pasted),",
        "batch 1, float32; ours with configs/torchvision_maskrcnn_r50_fpn.py as it is (each image padded to a",
        "multiple of 32, as torchvision pads). Agreement is over the top 50 detections (masks binarised at 0.5);",
        "steady-state times are medians of calls made in turns with torchvision's; our first call compiles when",
        "the photograph's canvas is new. The machine is shared: absolute times move with its load, ratios less.",
        "",
        "| photograph | size | canvas | labels agree | max score diff | max box diff (px) | median / min mask IoU "
        "| torchvision (s) | ours, first call (s) | ours, steady (s) | ours / torchvision |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, size, canvas, stats, theirs, first, ours in rows:
        lines.append(f"| {name} | {size[0]}x{size[1]} | {canvas[0]}x{canvas[1]} | {stats['labels_agree']:.0%} | "
                     f"{stats['max_score_diff']:.1e} | {stats['max_box_diff']:.3f} | {stats['median_mask_iou']:.3f} / "
                     f"{stats['min_mask_iou']:.3f} | {theirs:.2f} | {first:.2f} | {ours:.2f} | {ours / theirs:.2f} |")
    lines += [
        "",
        f"grace_hopper on the fixed 1344x1344 canvas instead (`--config.data.eval_canvas=fixed`, one compile for "
        f"every image): labels agree {fixed_stats['labels_agree']:.0%}, max box diff "
        f"{fixed_stats['max_box_diff']:.1f} px, median mask IoU {fixed_stats['median_mask_iou']:.3f}; first call "
        f"{fixed_first:.2f} s, steady {fixed_steady:.2f} s ({fixed_steady / grace_torch:.2f}x torchvision).",
        "",
        f"A stream of {args.stream} photographs of mixed sizes (random crops and rescalings of the five, "
        f"{min(s[0] for s in sizes)} to {max(s[0] for s in sizes)} px high, {min(s[1] for s in sizes)} to "
        f"{max(s[1] for s in sizes)} px wide), through a fresh Predictor:",
        "",
        "| canvases | compiles | distinct canvases | whole stream, compiles included (s) |",
        "|---|---|---|---|",
    ]
    for label, compiles, distinct, seconds in stream_rows:
        lines.append(f"| {label} | {compiles} | {distinct} | {seconds:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("parity_speed", text)


def alternating_medians(first, second, repeats):
    """(median seconds of first(), median seconds of second()), called in turns, so that a change in the load of
    this shared machine hits both sides alike."""
    times = ([], [])
    for _ in range(repeats):
        for fn, out in zip((first, second), times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _resized(predictor, image):
    from maskrcnn_jax.serving import host

    return host.resized_size(image.shape[0], image.shape[1], predictor.spec)


if __name__ == "__main__":
    main()
