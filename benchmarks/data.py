"""Input-pipeline throughput on COCO-like data: 640x480 JPEGs with about 7 instances each.

    .venv/bin/python benchmarks/data.py                 # all settings, 2 cores as they are on CI
    .venv/bin/python benchmarks/data.py --images=128 --batches=30 --settings=coco_800x1333

It writes a synthetic COCO-format folder (shapes drawn on textured backgrounds, saved as JPEG quality 90),
builds it with the TFDS builder, and then times `TrainIterator` (decode, jitter, resize, flip, normalise,
pad, mask cropping at 112x112, batching and the hand-over as NumPy arrays) in steady state, after warm-up
batches. Prints a Markdown table: images/s per setting, plus the build rate.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn_jax.data import coco_dataset  # noqa: E402
from maskrcnn_jax.data import pipeline, synthetic  # noqa: E402
from maskrcnn_jax.data.transforms import InputOptions  # noqa: E402

SETTINGS = {
    # detectron2's standard COCO schedule: short side 800, long side at most 1333, on a 1344^2 canvas.
    "coco_800x1333": InputOptions(canvas_size=(1344, 1344), short_side=800, long_side_max=1333,
                                  max_instances=100, mask_size=112),
    # TF Model Garden's large-scale jitter on a 1024^2 canvas.
    "lsj_1024": InputOptions(canvas_size=(1024, 1024), scale_jitter=(0.1, 2.0), max_instances=100, mask_size=112),
    # The CPU demo: a 320^2 canvas.
    "demo_320": InputOptions(canvas_size=(320, 320), scale_jitter=(0.8, 1.25), max_instances=32, mask_size=56),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="640x480 images to generate")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=24, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches per setting")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    parser.add_argument("--workdir", default=None, help="keep the generated data here (default: a temp dir)")
    args = parser.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix="maskrcnn_data_bench_")
    coco_like = synthetic.ShapesOptions(image_shape=(480, 640), object_size_range=(30.0, 250.0),
                                        objects_per_image=(5, 9), empty_fraction=0.0, jpeg_quality=90)
    start = time.perf_counter()
    paths = synthetic.generate(os.path.join(workdir, "coco_like"), num_train=args.images, num_val=0, seed=0,
                               options=coco_like)
    generate_seconds = time.perf_counter() - start
    paths.update(val_json=None, val_images=None)
    start = time.perf_counter()
    builder = coco_dataset.build({"name": f"coco_like_{args.images}", "data_dir": os.path.join(workdir, "tfds"),
                                 **paths})
    build_seconds = time.perf_counter() - start
    summary = coco_dataset.build_summary(builder)["train"]

    rows = []
    for name in args.settings.split(","):
        options = SETTINGS[name]
        iterator = pipeline.TrainIterator(builder, options, batch_size=args.batch_size, seed=0)
        for _ in range(args.warmup):
            next(iterator)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(iterator)
        seconds = time.perf_counter() - start
        rows.append((name, options, args.batches * args.batch_size / seconds))

    print(f"machine: {os.cpu_count()} cores; {summary['images']} images 640x480 JPEG, "
          f"{summary['instances'] / summary['images']:.1f} instances/image; batch {args.batch_size}, "
          f"{args.batches} timed batches after {args.warmup} warm-up")
    print(f"generate: {args.images / generate_seconds:.1f} images/s; TFDS build (incl. TF start-up): "
          f"{args.images / build_seconds:.1f} images/s\n")
    print("| setting | canvas | resize | jitter | G | M | images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, o, rate in rows:
        resize = f"short {o.short_side}, long <= {o.long_side_max}" if o.short_side else "fit canvas"
        print(f"| {name} | {o.canvas_size[0]}x{o.canvas_size[1]} | {resize} | {o.scale_jitter[0]}-{o.scale_jitter[1]} "
              f"| {o.max_instances} | {o.mask_size} | {rate:.1f} |")


if __name__ == "__main__":
    main()
