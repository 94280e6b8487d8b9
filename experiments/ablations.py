"""The Mask R-CNN paper's ablations (He et al., 2017, Table 2) as experiments on the generated shapes.

    .venv/bin/python experiments/ablations.py [--seeds=0,1,2] [--num_steps=N] [--variants=baseline,roi_pool]
        [--config=configs/shapes.py] [--runs_dir=workdir/ablations] [--out=experiments/RESULTS.md]
        [--config.a.b=value ...]

Every variant is the config file with one override (VARIANTS); every (variant, seed) is one run of
`maskrcnn_jax.main` in RUNS_DIR/<variant>/seed<S>, with the same budget: --num_steps, and the warmup and the
learning-rate drop scaled from the config's own schedule to that many steps. Extra `--config.a.b=value` flags
go to every run (a variant's own override wins over them). A run is finished when its eval_metrics.jsonl has a
line at the final step; finished runs are skipped, so a killed invocation resumes where it stopped (an unfinished
run resumes from its own checkpoint). All runs read the one dataset the config names, built by the first run.

Writes, next to --out: the Markdown report (--out), results.json (every run's final metrics and the summary;
experiments/ablations.ipynb reads it) and ablations.png (a bar chart). The report's analysis, between
ANALYSIS_BEGIN and ANALYSIS_END, is written by hand and kept as it is when the report is rewritten.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> the config overrides that make it (the baseline is the config file as it is).
VARIANTS: dict[str, dict[str, str]] = {
    "baseline": {},
    "roi_pool": {"model.roi_heads.roi_op": "pool"},
    "align_unaligned": {"model.roi_heads.aligned": "False"},
    "softmax_mask": {"model.roi_heads.mask_loss": "softmax"},
    "class_agnostic_mask": {"model.roi_heads.class_agnostic_mask": "True"},
    "mlp_head": {"model.roi_heads.mask_head": "mlp"},
}

# The paper's Table 2 (COCO minival mask AP): (setting, AP with the component the baseline keeps, AP without it).
# The measured effect of a variant is baseline minus variant, the same sign as the paper's gain.
PAPER_TABLE2: dict[str, dict[str, Any]] = {
    "roi_pool": {"comparison": "RoIAlign vs RoIPool", "setting": "R50-C4, Table 2c",
                 "with": 30.3, "without": 26.9},
    "align_unaligned": {"comparison": "RoIAlign aligned=True vs False", "setting": "not in the paper",
                        "with": None, "without": None},
    "softmax_mask": {"comparison": "per-class sigmoid vs softmax", "setting": "R50-C4, Table 2b",
                     "with": 30.3, "without": 24.8},
    "class_agnostic_mask": {"comparison": "class-specific vs class-agnostic", "setting": "R50-C4, Section 4.2",
                            "with": 30.3, "without": 29.7},
    "mlp_head": {"comparison": "FCN vs MLP mask head", "setting": "R50-FPN, Table 2e",
                 "with": 33.6, "without": 31.5},
}

METRICS = ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP")
METRIC_LABELS = {"segm_AP": "mask AP", "segm_AP50": "mask AP50", "segm_AP75": "mask AP75", "bbox_AP": "box AP"}
ANALYSIS_BEGIN = "<!-- analysis: written by hand, kept by the runner -->"
ANALYSIS_END = "<!-- end of analysis -->"
ANALYSIS_PLACEHOLDER = "_Not written yet: the analysis is written by hand once the runs above exist._"
RUN_RECORD = "ablation_run.json"
CHART_NAME = "ablations.png"
RESULTS_NAME = "results.json"


# ----------------------------------------------------------------------------------------------------
# The budget and the command of one run.


def load_config(config_path: str):
    """get_config() of a config file, as --config=PATH gives it."""
    from maskrcnn_jax import config as config_lib

    return config_lib.load(config_path)


def budget_overrides(config_path: str, num_steps: int | None) -> dict[str, str]:
    """num_steps with the config's warmup and lr drops scaled by the same factor, so a shorter budget keeps the
    schedule's shape (warmup 1/12 and the drop at 5/6 of training in configs/shapes.py)."""
    train = load_config(config_path).train
    if num_steps is None:
        num_steps = int(train.num_steps)
    scale = num_steps / int(train.num_steps)
    warmup = int(round(train.warmup_steps * scale))
    lr_steps = tuple(max(1, int(round(s * scale))) for s in train.lr_steps)
    return {"train.num_steps": str(num_steps), "train.warmup_steps": str(warmup),
            "train.lr_steps": "(" + "".join(f"{s}," for s in lr_steps) + ")"}


def run_overrides(variant: str, seed: int, budget: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """Every override of one run, each key once: budget, then the caller's extras, then seeds and the variant."""
    return {**budget, **extra, "train.seed": str(seed), "data.seed": str(seed), **VARIANTS[variant]}


def run_command(config_path: str, workdir: str, overrides: Mapping[str, str]) -> list[str]:
    return ([sys.executable, "-m", "maskrcnn_jax.main", f"--config={config_path}", f"--workdir={workdir}"]
            + [f"--config.{key}={value}" for key, value in overrides.items()])


def run_dir(runs_dir: str, variant: str, seed: int) -> str:
    return os.path.join(runs_dir, variant, f"seed{seed}")


def final_metrics(workdir: str, num_steps: int) -> dict[str, float] | None:
    """The eval_metrics.jsonl line at `num_steps` (the last one if several), or None: the run is not finished."""
    from maskrcnn_jax.engine import workdir as workdir_lib

    found = [record for record in workdir_lib.read_eval_metrics(workdir) if int(record["step"]) == num_steps]
    return found[-1] if found else None


def check_same_run(workdir: str, overrides: Mapping[str, str], config_path: str) -> None:
    """A workdir belongs to one (config, overrides): resuming it under another budget would mix two schedules."""
    path = os.path.join(workdir, RUN_RECORD)
    if not os.path.exists(path):
        return
    with open(path) as f:
        record = json.load(f)
    if record["overrides"] != dict(overrides) or record["config"] != config_path:
        raise SystemExit(f"{workdir} was started with config {record['config']} and overrides "
                         f"{record['overrides']}, not {config_path} and {dict(overrides)}: delete it or choose "
                         f"another --runs_dir")


def execute_run(config_path: str, workdir: str, overrides: Mapping[str, str], env: Mapping[str, str]) -> float:
    """Runs maskrcnn_jax.main to the end (its log in WORKDIR/train.log); returns the wall time in seconds."""
    os.makedirs(workdir, exist_ok=True)
    record_path = os.path.join(workdir, RUN_RECORD)
    record = {"config": config_path, "overrides": dict(overrides), "seconds": []}
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    command = run_command(config_path, workdir, overrides)
    start = time.perf_counter()
    with open(os.path.join(workdir, "train.log"), "a") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        result = subprocess.run(command, cwd=ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    record["seconds"].append(round(seconds, 1))  # one entry per attempt; a resumed run has several
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    if result.returncode != 0:
        raise SystemExit(f"run failed (exit {result.returncode}); see {os.path.join(workdir, 'train.log')}")
    return seconds


def run_environment(runs_dir: str) -> dict[str, str]:
    """The runs share a persistent compilation cache: the seeds of one variant compile the same programs."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(os.path.join(runs_dir, "jax_cache")))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


# ----------------------------------------------------------------------------------------------------
# Summary.


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for a single value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else float("nan")


def summarize(runs: Sequence[Mapping[str, Any]], variants: Sequence[str]) -> dict[str, dict[str, Any]]:
    """variant -> {'n', 'seeds', metric: {'mean', 'std'}} in percent, over its finished runs."""
    summary = {}
    for variant in variants:
        finished = [r for r in runs if r["variant"] == variant and r["metrics"] is not None]
        entry: dict[str, Any] = {"n": len(finished), "seeds": [r["seed"] for r in finished]}
        for key in METRICS:
            if finished:
                mean, std = mean_std([100.0 * r["metrics"][key] for r in finished])
                entry[key] = {"mean": mean, "std": std}
        summary[variant] = entry
    return summary


def effects(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ablated variant: baseline minus variant in mask AP (points) and the standard error of that difference,
    sqrt(s_b^2 / n_b + s_v^2 / n_v), beside the paper's gain for the same component."""
    out = {}
    base = summary.get("baseline", {})
    for variant, paper in PAPER_TABLE2.items():
        entry = {**paper, "paper_delta": None if paper["with"] is None else round(paper["with"] - paper["without"], 1)}
        measured = summary.get(variant, {})
        if base.get("n") and measured.get("n"):
            b, v = base["segm_AP"], measured["segm_AP"]
            entry["delta"] = b["mean"] - v["mean"]
            variances = [s["std"] ** 2 / n for s, n in ((b, base["n"]), (v, measured["n"])) if n > 1]
            entry["delta_se"] = math.sqrt(sum(variances)) if len(variances) == 2 else float("nan")
        out[variant] = entry
    return out


# ----------------------------------------------------------------------------------------------------
# Report: results.json, the chart and RESULTS.md.


def _pm(stat: Mapping[str, float] | None) -> str:
    if not stat:
        return "–"
    std = "n/a" if math.isnan(stat["std"]) else f"{stat['std']:.1f}"
    return f"{stat['mean']:.1f} ± {std}"


def _signed(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "–"
    text = f"{value:+.1f}"
    if se is not None:
        text += " ± " + ("n/a" if math.isnan(se) else f"{se:.1f}")
    return text


def read_analysis(report_path: str) -> str:
    """The hand-written text between the markers of an existing report, or the placeholder."""
    if os.path.exists(report_path):
        with open(report_path) as f:
            text = f.read()
        if ANALYSIS_BEGIN in text and ANALYSIS_END in text:
            return text.split(ANALYSIS_BEGIN, 1)[1].split(ANALYSIS_END, 1)[0].strip("\n")
    return ANALYSIS_PLACEHOLDER


def format_report(results: Mapping[str, Any], analysis: str) -> str:
    budget, summary = results["budget"], results["summary"]
    lines = [
        "# Mask R-CNN ablations on the generated shapes",
        "",
        "Each row is `" + results["config"] + "` with one override, trained from scratch with the same budget "
        f"and evaluated once at the end on the {results['num_val_images']} validation images (COCO AP@[.5:.95], "
        "AP50 and AP75, in percent). Mean ± sample standard deviation over the seeds; the seed sets both `train.seed` "
        "(initialisation, RoI sampling) and `data.seed` (shuffling, flips).",
        "",
        f"**Budget:** {budget['num_steps']} steps of {budget['batch_size']} images per run "
        f"(warmup {budget['warmup_steps']} steps, learning rate ×{budget['lr_gamma']} at step(s) "
        f"{', '.join(str(s) for s in budget['lr_steps'])}), seeds {', '.join(str(s) for s in results['seeds'])}; "
        f"{budget['note']}",
        "",
        f"**Code:** commit {results['code_commit']}.",
        "",
        "**Command:**",
        "",
        "```sh",
        results["command"],
        "```",
        "",
        "| variant | override | seeds | mask AP | mask AP50 | mask AP75 | box AP | wall minutes per run |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant in results["variants"]:
        entry = summary[variant]
        override = ", ".join(f"`{k}={v}`" for k, v in VARIANTS[variant].items()) or "(none)"
        minutes = [r["minutes"] for r in results["runs"] if r["variant"] == variant and r["minutes"]]
        minutes_text = f"{np.mean(minutes):.1f}" if minutes else "–"
        cells = [_pm(entry.get(key)) for key in METRICS]
        lines.append(f"| {variant} | {override} | {entry['n']} | " + " | ".join(cells) + f" | {minutes_text} |")
    missing = [f"{r['variant']} seed {r['seed']}" for r in results["runs"] if r["metrics"] is None]
    if missing:
        lines += ["", "**Missing runs (not finished, so not in the table):** " + ", ".join(missing) + "."]
    lines += ["", f"![mask AP per variant]({CHART_NAME})", "",
              "## Against the paper's Table 2", "",
              "Effect = AP with the paper's choice minus AP without it (baseline minus variant), in mask AP points. "
              "Measured: ± the standard error of the difference of the two means, "
              "sqrt(s_b²/n_b + s_v²/n_v).", "",
              "| component | variant | paper setting | paper (with → without) | paper effect | measured effect |",
              "| --- | --- | --- | --- | ---: | ---: |"]
    for variant, effect in results["effects"].items():
        if variant not in results["variants"]:
            continue
        paper = "–" if effect["with"] is None else f"{effect['with']} → {effect['without']}"
        measured = _signed(effect.get("delta"), effect.get("delta_se")) if "delta" in effect else "not measured"
        lines.append(f"| {effect['comparison']} | {variant} | {effect['setting']} | {paper} | "
                     f"{_signed(effect['paper_delta'])} | {measured} |")
    lines += ["", "## Analysis", "", ANALYSIS_BEGIN, analysis, ANALYSIS_END, ""]
    return "\n".join(lines)


def plot_results(results: Mapping[str, Any], path: str | None = None, ax=None):
    """Grouped bars (mask AP, AP50, AP75: mean ± std) per variant with every seed as a dot; saved to `path`."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in results["variants"] if results["summary"][v]["n"]]
    keys = ("segm_AP", "segm_AP50", "segm_AP75")
    own_figure = ax is None
    if own_figure:
        fig, ax = plt.subplots(figsize=(1.6 * len(variants) + 2.5, 4.2))
    width = 0.8 / len(keys)
    x = np.arange(len(variants))
    for k, key in enumerate(keys):
        offset = x + (k - (len(keys) - 1) / 2) * width
        means = [results["summary"][v][key]["mean"] for v in variants]
        stds = [np.nan_to_num(results["summary"][v][key]["std"]) for v in variants]
        ax.bar(offset, means, width, yerr=stds, capsize=3, label=METRIC_LABELS[key], alpha=0.85)
        for i, variant in enumerate(variants):
            seeds = [100.0 * r["metrics"][key] for r in results["runs"]
                     if r["variant"] == variant and r["metrics"] is not None]
            ax.plot(np.full(len(seeds), offset[i]), seeds, "k.", markersize=4)
    ax.set_xticks(x, variants, rotation=20, ha="right")
    ax.set_ylabel("COCO AP on the shapes validation split (%)")
    ax.set_title(f"Ablations, {results['budget']['num_steps']} steps, "
                 f"{len(results['seeds'])} seed(s): mean ± std, dots are seeds")
    top = max([100.0 * r["metrics"][k] for r in results["runs"] if r["metrics"] for k in keys] + [1.0])
    ax.set_ylim(0, 1.2 * top)  # headroom for the legend above the bars
    ax.legend(loc="upper center", ncols=len(keys), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if own_figure:
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
            plt.close(fig)
    return ax


def collect(runs_dir: str, variants: Sequence[str], seeds: Sequence[int], num_steps: int,
            results_dir: str) -> list[dict[str, Any]]:
    """Per (variant, seed): its final metrics (None when unfinished), minutes, and where its overlays are
    (relative to results_dir, so results.json stays valid wherever the folders move together)."""
    runs = []
    for variant in variants:
        for seed in seeds:
            workdir = run_dir(runs_dir, variant, seed)
            metrics = final_metrics(workdir, num_steps)
            minutes = None
            record_path = os.path.join(workdir, RUN_RECORD)
            if os.path.exists(record_path):
                with open(record_path) as f:
                    minutes = round(sum(json.load(f)["seconds"]) / 60.0, 2) or None
            overlays = os.path.join(workdir, "overlays", f"step_{num_steps:08d}")
            runs.append({
                "variant": variant, "seed": seed,
                "workdir": os.path.relpath(workdir, results_dir),
                "overlays": os.path.relpath(overlays, results_dir) if os.path.isdir(overlays) else None,
                "metrics": None if metrics is None else {k: v for k, v in metrics.items() if k != "step"},
                "minutes": minutes,
            })
    return runs


def write_report(out_path: str, results: Mapping[str, Any]) -> None:
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, RESULTS_NAME), "w") as f:
        json.dump(results, f, indent=2)
    if any(results["summary"][v]["n"] for v in results["variants"]):
        plot_results(results, os.path.join(out_dir, CHART_NAME))
    report = format_report(results, read_analysis(out_path))
    with open(out_path, "w") as f:
        f.write(report)


# ----------------------------------------------------------------------------------------------------
# Command line.


def code_commit() -> str:
    """The commit of the code the runs used, marked dirty when maskrcnn_jax/ or configs/ differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    return commit + (" with uncommitted changes" if git("status", "--porcelain", "--", "maskrcnn_jax", "configs")
                     else "")


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Any --config.a.b=value flag is passed on to every run.")
    parser.add_argument("--config", default="configs/shapes.py", help="The config file every variant starts from.")
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds (train.seed and data.seed).")
    parser.add_argument("--num_steps", type=int, default=None,
                        help="Training steps per run (default: the config's); warmup and lr_steps scale with it.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset of VARIANTS.")
    parser.add_argument("--runs_dir", default="workdir/ablations", help="Where each run's workdir goes.")
    parser.add_argument("--out", default="experiments/RESULTS.md",
                        help="The report; results.json and ablations.png are written next to it.")
    parser.add_argument("--report_only", action="store_true",
                        help="Write the report from the finished runs without starting any.")
    args, rest = parser.parse_known_args(argv)
    extra = {}
    for flag in rest:
        if not flag.startswith("--config.") or "=" not in flag:
            parser.error(f"unrecognized argument {flag!r} (config overrides are --config.a.b=value)")
        key, value = flag[len("--config."):].split("=", 1)
        extra[key] = value
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if not args.seed_list:
        parser.error("--seeds names no seed")
    return args, extra


def main(argv: Sequence[str]) -> dict[str, Any]:
    args, extra = parse_args(argv)
    config_path = args.config
    budget = budget_overrides(os.path.join(ROOT, config_path) if not os.path.isabs(config_path) else config_path,
                              args.num_steps)
    budget.update({k: v for k, v in extra.items() if k in budget})  # an explicit override of a budget knob wins
    extra = {k: v for k, v in extra.items() if k not in budget}
    num_steps = int(budget["train.num_steps"])
    env = run_environment(args.runs_dir)
    # Seed-major order: when the time runs out, every variant has the same number of seeds finished.
    for seed in args.seed_list:
        for variant in args.variant_list:
            workdir = run_dir(args.runs_dir, variant, seed)
            overrides = run_overrides(variant, seed, budget, extra)
            if final_metrics(workdir, num_steps) is not None:
                print(f"skip {variant} seed {seed}: finished ({workdir})", flush=True)
                continue
            if args.report_only:
                print(f"missing {variant} seed {seed}: not finished ({workdir})", flush=True)
                continue
            check_same_run(workdir, overrides, config_path)
            print(f"run {variant} seed {seed} -> {workdir}", flush=True)
            seconds = execute_run(config_path, workdir, overrides, env)
            metrics = final_metrics(workdir, num_steps)
            if metrics is None:
                raise SystemExit(f"{workdir} ended without an evaluation at step {num_steps}")
            print(f"done {variant} seed {seed} in {seconds / 60:.1f} min: mask AP {100 * metrics['segm_AP']:.1f}, "
                  f"box AP {100 * metrics['bbox_AP']:.1f}", flush=True)

    config = load_config(os.path.join(ROOT, config_path) if not os.path.isabs(config_path) else config_path)
    results_dir = os.path.dirname(os.path.abspath(args.out))
    runs = collect(args.runs_dir, args.variant_list, args.seed_list, num_steps, results_dir)
    summary = summarize(runs, args.variant_list)
    lr_steps = [int(s) for s in budget["train.lr_steps"].strip("()").split(",") if s.strip()]
    batch_size = int(extra.get("train.batch_size", config.train.batch_size))
    num_train = int(extra.get("data.shapes.num_train", config.data.shapes.num_train))
    note = f"{num_steps * batch_size} training images seen per run"
    if num_train:
        note += f", {num_steps * batch_size / num_train:.1f} passes over the {num_train} training images"
    results = {
        "config": config_path,
        "variants": args.variant_list,
        "seeds": args.seed_list,
        "budget": {"num_steps": num_steps, "batch_size": batch_size,
                   "warmup_steps": int(budget["train.warmup_steps"]), "lr_steps": lr_steps,
                   "lr_gamma": float(extra.get("train.lr_gamma", config.train.lr_gamma)), "note": note},
        "extra_overrides": extra,
        "num_val_images": int(extra.get("data.shapes.num_val", config.data.shapes.num_val)) or "evaluation split's",
        "code_commit": code_commit(),
        # --report_only is left out: the runs it reports are the ones the command without it produces (or skips).
        "command": shlex.join([".venv/bin/python", "experiments/ablations.py",
                               *(a for a in argv if a != "--report_only")]),
        "runs": runs,
        "summary": summary,
        "effects": effects(summary),
        "paper_table2": PAPER_TABLE2,
    }
    write_report(args.out, results)
    print(f"wrote {args.out}, {os.path.join(results_dir, RESULTS_NAME)} and {os.path.join(results_dir, CHART_NAME)}",
          flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
