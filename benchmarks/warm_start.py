"""A warm start for `maskrcnn-predict`: the whole command on one photograph, run as a user runs it, once per process,
with JAX's persistent compilation cache off, on an empty cache (the first run, which compiles and writes it) and on
that cache (the second run).

    .venv/bin/python benchmarks/warm_start.py [--runs=2]        # prints the table
    .venv/bin/python benchmarks/warm_start.py --write           # and rewrites RESULTS.md's warm_start section

The workdir is torchvision's maskrcnn_resnet50_fpn with seeded random weights (as in the parity test, so the
detections are real ones), imported with `python -m maskrcnn_jax.convert`; the photograph is grace_hopper (600 x 512,
a 960 x 800 canvas). Each run is a fresh process doing what `maskrcnn-predict` does (predict.main: enable the
cache, Predictor.from_checkpoint, the image, its overlay and JSON), with its stages timed: the whole process from
its start to its exit, the imports, the restore, the first image (the network's compile, or its load from the
cache) and a second call on the same image (the steady state). Medians of --runs runs; "cache entries added" counts
the files a run wrote into the cache folder.
"""

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from timing import head_commit, machine_line, write_section  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


def make_workdir(scratch: pathlib.Path) -> pathlib.Path:
    import torch
    import torchvision
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests"))
    import torchvision_reference

    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    torchvision_reference.randomize_torchvision_model(torch, model)
    torch.save(model.state_dict(), scratch / "maskrcnn_random.pth")
    workdir = scratch / "workdir"
    subprocess.run([sys.executable, "-m", "maskrcnn_jax.convert", "--from=torchvision",
                    str(scratch / "maskrcnn_random.pth"), f"--out={workdir}"], cwd=REPO, check=True,
                   capture_output=True)
    Image.fromarray(torchvision_reference.grace_hopper()).save(scratch / "grace_hopper.jpg", quality=95)
    return workdir


def cache_entries(cache: pathlib.Path) -> int:
    return sum(len(files) for _, _, files in os.walk(cache)) if cache.exists() else 0


def child(workdir: str, image: str, out: str, cache_setting: str) -> None:
    """One `maskrcnn-predict` run, as predict.main makes it, with its stages timed; prints them as JSON."""
    import json

    start = time.perf_counter()
    from maskrcnn_jax import predict
    from maskrcnn_jax.data.devices import hide_accelerators_from_tensorflow
    from maskrcnn_jax.engine import compilation_cache
    from maskrcnn_jax.serving.predictor import Predictor

    hide_accelerators_from_tensorflow()
    compilation_cache.enable(cache_setting)
    imported = time.perf_counter()
    predictor = Predictor.from_checkpoint(workdir)
    restored = time.perf_counter()
    predict.predict_files(predictor, [image], out)  # the first image: compile (or load), predict, write
    first = time.perf_counter()
    predictor(predict.read_image(image))
    second = time.perf_counter()
    print(json.dumps({"imports_s": imported - start, "restore_s": restored - imported, "first_image_s": first - restored,
                      "steady_image_s": second - first}))


def timed_run(scratch: pathlib.Path, workdir: pathlib.Path, cache_setting: str, run: int) -> dict:
    import json

    command = [sys.executable, __file__, "--child", str(workdir), str(scratch / "grace_hopper.jpg"),
               str(scratch / f"out_{run}"), cache_setting]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    stages = json.loads(result.stdout.strip().splitlines()[-1])
    stages["process_s"] = time.perf_counter() - start
    return stages


def medians(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main():
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="rewrite the warm_start section of RESULTS.md")
    parser.add_argument("--runs", type=int, default=2, help="runs per row (the median is shown)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = pathlib.Path(scratch_name)
        workdir = make_workdir(scratch)
        run = 0
        off, first, second, added_first, added_second = [], [], [], [], []
        for attempt in range(args.runs):
            off.append(timed_run(scratch, workdir, "", run))
            cache = scratch / f"cache_{attempt}"
            first.append(timed_run(scratch, workdir, str(cache), run + 1))
            added_first.append(cache_entries(cache))
            before = cache_entries(cache)
            second.append(timed_run(scratch, workdir, str(cache), run + 2))
            added_second.append(cache_entries(cache) - before)
            run += 3
        rows = [("off", medians(off), 0), ("first run, empty cache", medians(first), max(added_first)),
                ("second run, same cache", medians(second), max(added_second))]

    lines = [f"Command: `.venv/bin/python benchmarks/warm_start.py --runs={args.runs}` at commit {head_commit()}, on "
             f"{machine_line()}.",
             "What `maskrcnn-predict` does, on one photograph (grace_hopper, 600x512, canvas 960x800) with an imported "
             "R50-FPN workdir, each run a fresh process; seconds, medians of the runs (the three kinds of run "
             "alternate).",
             "",
             "| compilation cache | whole process | imports | restore | first image | steady image | "
             "cache entries added |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {t['process_s']:.2f} | {t['imports_s']:.2f} | {t['restore_s']:.2f} | "
              f"{t['first_image_s']:.2f} | {t['steady_image_s']:.2f} | {added} |" for name, t, added in rows]
    off_t, second_t = rows[0][1], rows[2][1]
    lines += ["", f"On the second run the first image takes {second_t['first_image_s']:.2f} s against "
                  f"{off_t['first_image_s']:.2f} s without the cache ({second_t['first_image_s'] / off_t['first_image_s']:.2f}x), "
                  f"{second_t['first_image_s'] - second_t['steady_image_s']:.2f} s above the steady state; the whole "
                  f"process {second_t['process_s'] / off_t['process_s']:.2f}x."]
    body = "## A warm start for prediction (`benchmarks/warm_start.py`)\n\n" + "\n".join(lines)
    print(body)
    if args.write:
        write_section("warm_start", body)


if __name__ == "__main__":
    main()
