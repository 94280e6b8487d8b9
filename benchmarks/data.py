"""Input-pipeline throughput per host core on COCO-like data (640x480 JPEGs, about 7 instances each), and the host
cores an 8-GPU machine needs to feed its accelerators.

    .venv/bin/python benchmarks/data.py                     # 1 and 2 cores, COCO settings; prints the section
    .venv/bin/python benchmarks/data.py --write             # and replaces its section of benchmarks/RESULTS.md
    .venv/bin/python benchmarks/data.py --cores=1,2,4,8 --step_images_per_s=300

It writes a synthetic COCO-format folder (shapes drawn on textured backgrounds, saved as JPEG quality 90), builds
it with the TFDS builder, and then times `pipeline.train_dataset` (decode, jitter, resize, crop, flip, pad as uint8,
mask cropping at 112x112, batching, and the hand-over as NumPy arrays, as `TrainIterator` hands it to training) in
steady state, after warm-up batches.

Per core: each core count N runs in its own process, pinned to N cores (os.sched_setaffinity, before TensorFlow
starts, so that every TensorFlow thread pool sizes itself to them) with a tf.data thread pool of N threads. Its
images/s divided by N is the rate per core; the cores needed are the step rate over the lowest per-core rate
measured for that setting (rounded up). That counts the pipeline only: the training loop's own thread and the
host-to-device copies need host time besides.

The step rate (--step_images_per_s) is the images/s the 8 accelerators of one host consume. Its default, 209, is
the R50-FPN Mask R-CNN training throughput NVIDIA publishes for 8 A100 80GB GPUs (DGX A100, mixed precision,
batch 12 per GPU, NGC PyTorch 21.12): the "Training performance: NVIDIA DGX A100 (8x A100 80GB)" table of
https://github.com/NVIDIA/DeepLearningExamples/blob/master/PyTorch/Segmentation/MaskRCNN/README.md. Pass the rate
benchmarks/accelerator.py measures on your accelerator (times 8) instead once you have it.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# images/s of 8 A100 80GB GPUs training R50-FPN Mask R-CNN (NVIDIA DeepLearningExamples, see the module doc)
PUBLISHED_8_GPU_IMAGES_PER_S = 209.0

SETTINGS = {
    # detectron2's standard COCO schedule: short side 800, long side at most 1333, on a 1344^2 canvas.
    "coco_800x1333": dict(canvas_size=(1344, 1344), short_side=800, long_side_max=1333, max_instances=100,
                          mask_size=112),
    # TF Model Garden's large-scale jitter on a 1024^2 canvas.
    "lsj_1024": dict(canvas_size=(1024, 1024), scale_jitter=(0.1, 2.0), max_instances=100, mask_size=112),
}


def pin_to_cores(count):
    """Keeps this process on the first `count` cores it may use; call before TensorFlow starts."""
    available = sorted(os.sched_getaffinity(0))
    if count > len(available):
        raise ValueError(f"{count} cores asked, this process may use {len(available)}")
    os.sched_setaffinity(0, available[:count])


def measure(sources, settings, cores, batch_size, batches, warmup):
    """{setting: images/s} of the pipeline pinned to `cores` cores with a tf.data pool of as many threads."""
    pin_to_cores(cores)
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from maskrcnn_jax.data import coco_dataset, pipeline
    from maskrcnn_jax.data.transforms import InputOptions

    builder = coco_dataset.get_builder(sources)
    threading = tf.data.Options()
    threading.threading.private_threadpool_size = cores
    rates = {}
    for name in settings:
        dataset = pipeline.train_dataset(builder, InputOptions(**SETTINGS[name]), batch_size=batch_size, seed=0)
        iterator = iter(tfds.as_numpy(dataset.with_options(threading)))
        for _ in range(warmup):
            next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        rates[name] = batches * batch_size / (time.perf_counter() - start)
    return rates


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def report(args, summary, generate_rate, build_rate, rates, load_averages, commit):
    cores = sorted(rates)
    lines = [
        "## data (`benchmarks/data.py`)",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/data.py', *sys.argv[1:]])}` at commit {commit}.",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; load average before each core count: "
        + ", ".join(f"{n} core(s) {load_averages[n]:.2f}" for n in cores) + ".",
        f"Data: {summary['images']} synthetic 640x480 JPEGs, {summary['instances'] / summary['images']:.1f} "
        f"instances per image; batch {args.batch_size}, {args.batches} timed batches after {args.warmup} warm-up, "
        "per setting and core count. Each core count runs in its own process pinned to that many cores, with a "
        "tf.data thread pool of as many threads; the pipeline hands uint8 canvases and 112x112 masks to the "
        "training loop.",
        "",
        "| setting | canvas | resize | jitter | "
        + " | ".join(f"{n} core(s): images/s | per core" for n in cores)
        + f" | cores for {args.step_images_per_s:g} images/s |",
        "| --- | --- | --- | --- | " + " | ".join("---: | ---:" for _ in cores) + " | ---: |",
    ]
    for name in args.settings.split(","):
        o = SETTINGS[name]
        resize = f"short {o['short_side']}, long <= {o['long_side_max']}" if o.get("short_side") else "fit canvas"
        jitter = "{:g}-{:g}".format(*o["scale_jitter"]) if "scale_jitter" in o else "none"
        per_core = {n: rates[n][name] / n for n in cores}
        needed = math.ceil(args.step_images_per_s / min(per_core.values()))
        lines.append(f"| {name} | {o['canvas_size'][0]}x{o['canvas_size'][1]} | {resize} | {jitter} | "
                     + " | ".join(f"{rates[n][name]:.1f} | {per_core[n]:.1f}" for n in cores) + f" | {needed} |")
    lines += [
        "",
        f"Cores needed = {args.step_images_per_s:g} images/s (the step rate of one 8-GPU host) / the lowest per-core "
        "rate of the row, rounded up; the pipeline only (the training loop's thread and the host-to-device copies "
        "come on top). "
        + ("The default step rate is NVIDIA's published R50-FPN Mask R-CNN training throughput on 8 A100 80GB "
           "(DGX A100, mixed precision, batch 12 per GPU; NVIDIA DeepLearningExamples, "
           "PyTorch/Segmentation/MaskRCNN/README.md); H100 and H200 hosts consume more and need more cores in "
           "proportion." if args.step_images_per_s == PUBLISHED_8_GPU_IMAGES_PER_S else ""),
        f"Generating the synthetic data ran at {generate_rate:.1f} images/s and the TFDS build (with TensorFlow's "
        f"start-up) at {build_rate:.1f} images/s, on all cores.",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="640x480 images to generate")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=100, help="timed batches per setting and core count")
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches per setting and core count")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    parser.add_argument("--cores", default="1,2", help="comma-separated core counts, each timed in its own process")
    parser.add_argument("--step_images_per_s", type=float, default=PUBLISHED_8_GPU_IMAGES_PER_S,
                        help="images/s the 8 accelerators of one host train at (default: NVIDIA's published 8x "
                             "A100 80GB R50-FPN Mask R-CNN throughput, see the module doc)")
    parser.add_argument("--workdir", default=None, help="keep the generated data here (default: a temp dir)")
    parser.add_argument("--write", action="store_true", help="replace the section in benchmarks/RESULTS.md")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one core count, JSON out
    args = parser.parse_args()
    settings = args.settings.split(",")
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; known: {', '.join(SETTINGS)}")

    if args.measure:
        job = json.loads(args.measure)
        print(json.dumps(measure(job["sources"], settings, job["cores"], args.batch_size, args.batches,
                                 args.warmup)))
        return

    from maskrcnn_jax.data import synthetic

    workdir = args.workdir or tempfile.mkdtemp(prefix="maskrcnn_data_bench_")
    coco_like = synthetic.ShapesOptions(image_shape=(480, 640), object_size_range=(30.0, 250.0),
                                        objects_per_image=(5, 9), empty_fraction=0.0, jpeg_quality=90)
    start = time.perf_counter()
    paths = synthetic.generate(os.path.join(workdir, "coco_like"), num_train=args.images, num_val=0, seed=0,
                               options=coco_like)
    generate_rate = args.images / (time.perf_counter() - start)
    sources = {"name": f"coco_like_{args.images}", "data_dir": os.path.join(workdir, "tfds"), **paths,
               "val_json": None, "val_images": None}
    # The build runs in its own process too, so that this one never starts TensorFlow's thread pools.
    start = time.perf_counter()
    build = ("import json, sys; from maskrcnn_jax.data import coco_dataset; "
             "b = coco_dataset.build(json.loads(sys.argv[1])); "
             "print(json.dumps(coco_dataset.build_summary(b)['train']))")
    summary = json.loads(subprocess.run([sys.executable, "-c", build, json.dumps(sources)], cwd=ROOT, check=True,
                                        capture_output=True, text=True).stdout.strip().splitlines()[-1])
    build_rate = args.images / (time.perf_counter() - start)

    rates, load_averages = {}, {}
    for cores in (int(n) for n in args.cores.split(",")):
        load_averages[cores] = os.getloadavg()[0]
        job = json.dumps({"sources": sources, "cores": cores})
        command = [sys.executable, os.path.abspath(__file__), f"--measure={job}", f"--settings={args.settings}",
                   f"--batch_size={args.batch_size}", f"--batches={args.batches}", f"--warmup={args.warmup}"]
        out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
        rates[cores] = json.loads(out.strip().splitlines()[-1])
        print(f"{cores} core(s): " + ", ".join(f"{k} {v:.1f} images/s" for k, v in rates[cores].items()),
              flush=True)

    from timing import head_commit

    commit = head_commit()
    section = report(args, summary, generate_rate, build_rate, rates, load_averages, commit)
    print("\n" + section)
    if args.write:
        from timing import write_section

        write_section("data", section)


if __name__ == "__main__":
    main()
