"""Where the memory of our train step goes on the CPU: XLA's memory analysis of benchmarks/model.py's compiled step
(same config, 800x1344 input and SGD) and what is alive at the step's peak, by part of the model.

    .venv/bin/python benchmarks/memory.py                         # Mask R-CNN; prints the section
    .venv/bin/python benchmarks/memory.py --write                 # and replaces its section of RESULTS.md
    .venv/bin/python benchmarks/memory.py --model=keypointrcnn
    .venv/bin/python benchmarks/memory.py --config=configs/test.py --height=128 --width=128   # a quick look

XLA's CPU backend gives a program one buffer for all its temporaries, of the size its heap simulator needs at the
peak (temp_size_in_bytes); benchmarks/model.py's peak RSS adds the runtime, the compiled code, the variables, the
optimizer state and the input. Compiling with --xla_dump_to writes each buffer's live range; the one alive at the
peak carry the name stack of the op that made them: jvp(...) for what the forward keeps for the backward,
transpose(...) for the backward's own. This groups them by the part of the model that made them. Nothing runs: the
step is only compiled (on abstract variables), so the numbers do not depend on the weights.
"""

import argparse
import collections
import os
import pathlib
import re
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import model as model_benchmark  # noqa: E402  (benchmarks/model.py: the config, input and step measured there)

# (label, pattern on the op's name stack), first match wins.
PARTS = (
    ("mask head (its fixed RoI bucket)", r"_positive_roi_losses|mask_head"),
    ("keypoint head", r"keypoint"),
    ("box head and RoI pooling", r"_box_features|box_head|_pooled_levels|_pool\b"),
    ("RPN and proposals", r"_proposals|rpn"),
    ("FPN", r"/fpn"),
    ("ResNet body", r"backbone/body"),
    ("parameters and optimizer state", r"^(params|opt_state|variables)"),  # the step's arguments
)
UNNAMED = "buffers without a name stack (copies and broadcasts XLA inserted, the input)"
PEAK_LINE = re.compile(r"Stack trace breakdown for peak usage: ([\d ]+) bytes")
ENTRY = re.compile(r"[├└]── (.*) \([\d.]+%, total: [\d ]+ bytes, current: ([\d ]+) bytes")


def part_of(name):
    """(part of the model, phase) of a buffer named by its op's name stack."""
    scope = re.sub(r"^jit\([^)]*\)/", "", name)
    if scope.startswith(("params", "opt_state", "variables")):
        return PARTS[-1][0], ""
    if "/" not in scope:
        return UNNAMED, ""
    phase = "backward" if scope.startswith("transpose(") else "forward, kept for the backward"
    for label, pattern in PARTS:
        if re.search(pattern, scope):
            return label, phase
    return "other", phase


def peak_breakdown(live_range_text):
    """(peak bytes, {(part, phase): bytes}) from the 'Stack trace breakdown for peak usage' of a live-range dump:
    each buffer alive at the peak ('current' bytes) once, at the deepest level that names it."""
    head, found, tail = live_range_text.partition("Stack trace breakdown for peak usage")
    if not found:
        raise SystemExit("the live-range dump has no peak breakdown (another XLA version?)")
    peak = int(PEAK_LINE.search(found + tail.splitlines()[0]).group(1).replace(" ", ""))
    entries = [(m.group(1), int(m.group(2).replace(" ", ""))) for m in map(ENTRY.search, tail.splitlines()) if m]
    totals = collections.Counter()
    for name, current in entries:
        if current and not name.startswith("region_"):
            totals[part_of(name)] += current
    return peak, totals


def compile_step(config_path, model_name, height, width):
    """Compiles benchmarks/model.py's train step on abstract variables; returns its CompiledMemoryStats."""
    import jax

    from maskrcnn_jax import config as config_lib
    from maskrcnn_jax.modeling import build_model

    if config_path:
        config = config_lib.load(config_path)
        config.model.detection.score_threshold = 0.0
    else:
        config = model_benchmark.our_config(model_name)
    batch = model_benchmark.our_batch(model_name, config, height, width)
    batch["gt_classes"] = 1 + (batch["gt_classes"] - 1) % (config.model.num_classes - 1)  # a smaller config's ids
    model = build_model(config.model)
    key = jax.random.key(0)
    variables = jax.eval_shape(lambda: model.init(key, batch, key, method=model.losses))
    train_step, optimizer = model_benchmark.our_train_step(model)
    opt_state = jax.eval_shape(optimizer.init, variables["params"])
    return train_step.lower(variables, opt_state, batch, key).compile().memory_analysis()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="maskrcnn", choices=sorted(model_benchmark.MODELS))
    parser.add_argument("--config", default=None, help="another config file (default: the model's, as model.py)")
    parser.add_argument("--height", type=int, default=model_benchmark.HEIGHT)
    parser.add_argument("--width", type=int, default=model_benchmark.WIDTH)
    parser.add_argument("--write", action="store_true", help="replace the section in benchmarks/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as dump_dir:
        # Before JAX starts its backend: XLA reads its flags once.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_dump_to={dump_dir} --xla_dump_hlo_module_re=.*train_step.*").strip()
        stats = compile_step(args.config, args.model, args.height, args.width)
        dumps = sorted(pathlib.Path(dump_dir).glob("*train_step*live-range.txt"))
        if not dumps:
            raise SystemExit(f"XLA wrote no live-range dump into {dump_dir}")
        peak, totals = peak_breakdown(dumps[-1].read_text())

    from timing import head_commit, machine_line, write_section

    mib = 2**20
    config_name = args.config or model_benchmark.MODELS[args.model].config_file
    command = "benchmarks/memory.py" + (f" --model={args.model}" if args.model != "maskrcnn" else "")
    if args.config:
        command += f" --config={args.config} --height={args.height} --width={args.width}"
    lines = [
        f"## Where the train step's memory goes (`{command}`)", "",
        f"Command: `.venv/bin/python {command} --write` (rewrites this section), at commit {head_commit()}.",
        f"Machine: {machine_line()}.",
        f"{config_name}, benchmarks/model.py's step (SGD with momentum) on one {args.height}x{args.width} image, "
        "compiled on abstract variables. XLA's memory analysis of the compiled step, and what is alive at its "
        "peak by the part of the model that made it (from XLA's buffer live ranges):", "",
        "| XLA's memory analysis | MiB |", "| --- | ---: |",
        f"| temporaries (one buffer, allocated at the step's start) | {stats.temp_size_in_bytes / mib:.0f} |",
        f"| arguments (variables, optimizer state, input) | {stats.argument_size_in_bytes / mib:.0f} |",
        f"| outputs (of which aliased to donated arguments) | {stats.output_size_in_bytes / mib:.0f} "
        f"({stats.alias_size_in_bytes / mib:.0f}) |", "",
        f"Alive at the peak: {peak / mib:.0f} MiB.", "",
        "| part of the model | made in | MiB | share |", "| --- | --- | ---: | ---: |"]
    for (part, phase), size in sorted(totals.items(), key=lambda item: -item[1]):
        if size >= mib:
            lines.append(f"| {part} | {phase or '–'} | {size / mib:.0f} | {100 * size / peak:.0f} % |")
    small = sum(size for size in totals.values() if size < mib)
    lines.append(f"| {len([s for s in totals.values() if s < mib])} smaller groups | – | {small / mib:.1f} | – |")
    body = "\n".join(lines) + "\n"
    print(body)
    if args.write:
        write_section("memory" if args.model == "maskrcnn" and not args.config else f"memory_{args.model}", body)


if __name__ == "__main__":
    main()
