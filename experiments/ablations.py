"""The Mask R-CNN paper's ablations (He et al., 2017: Table 2a-e and Table 6) as studies on generated data.

    .venv/bin/python experiments/ablations.py [--studies=2a,2b,2c,2d,2e,t6] [--seeds=0,1,2] [--num_steps=N]
        [--variants=2c:pool,2d:align ...] [--with_optional] [--runs_dir=workdir/ablations]
        [--out=experiments/RESULTS.md] [--report_only] [--allow_dirty] [--config.a.b=value ...]
    .venv/bin/python experiments/ablations.py --smoke [--studies=...]          # every variant, a few steps
    .venv/bin/python experiments/ablations.py --pilot [--studies=2c,2e] [--pilot_budgets=150,300]
        [--pilot_seeds=0,1,2,3] [--pilot_hours=6]

A study (STUDIES) is a base config file and its variants, each variant that config (or its own config file) with a
few overrides, mirroring one part of the paper's tables; its effects are the paper's comparisons (the variant with
the paper's choice minus the one without it), each beside the paper's own numbers. A run is one (config file,
overrides, budget, seed): RUNS_DIR/<config>/<overrides>/steps<N>/seed<S>, trained by `maskrcnn_jax.main` with
--num_steps steps (the config's warmup and learning-rate drops scaled to the same fractions) and evaluated once at
the end. Studies that name the same config and overrides share the run (the C4 baseline is 2a's C4 row and 2c's
RoIAlign row). Extra `--config.a.b=value` flags go to every run; a variant's own overrides win over them.

Resuming: a run is finished when its eval_metrics.jsonl has a line at the final step, and is then skipped; an
unfinished one resumes from its own checkpoint; a workdir started with other overrides is refused. A run the
committed results.json (next to --out) records as finished, at the same budget and extra overrides, is finished too
when its workdir is gone (a new checkout, another machine): it is skipped, and the report carries its recorded
metrics and provenance and says which runs it took from there. Each run's
record (RUNS_DIR/.../ablation_run.json) holds its wall and CPU seconds, the commit it ran and whether the code
(CODE_PATHS) had uncommitted changes; a run is refused on an edited tree unless --allow_dirty, and the report
leaves such runs out unless --allow_dirty (then it marks them). The report is rewritten after every run.

Writes next to --out: the Markdown report (--out; its suite, pilot and hand-written analysis are three blocks
between markers, each kept when another is rewritten), results.json (the studies, every run's final metrics, the
summaries and effects; experiments/ablations.ipynb reads it), ablations.png (every study beside the paper) and,
with --pilot, pilot.json.

--smoke trains every selected variant for a few steps on 16 generated images (RUNS_DIR/smoke): it shows that every
variant builds, trains and evaluates, and measures each variant's seconds per step for the pilot's estimate.
--pilot trains the baseline of each selected study at each of --pilot_budgets with each of --pilot_seeds, records
the seed-to-seed standard deviation of its AP per budget, and prints (and writes into the report's pilot block) the
seeds that make a 2-point effect stand out at two standard errors at each budget, with the hours the whole suite
would take there. Pilot runs are ordinary runs: the suite at a piloted budget reuses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAPER = "He, Gkioxari, Dollár, Girshick: Mask R-CNN (ICCV 2017, arXiv 1703.06870), COCO minival"


# ----------------------------------------------------------------------------------------------------
# The studies.


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of a study: the study's config file (or `config`) with `overrides`."""

    name: str
    label: str  # what the row is, in the paper's words where it has them
    overrides: Mapping[str, str] = dataclasses.field(default_factory=dict)
    config: str | None = None  # the study's config unless set
    paper_row: str | None = None  # the paper's row this one mirrors
    paper: Mapping[str, float] | None = None  # that row's numbers (metric -> AP in percent), as printed
    optional: bool = False  # run only when --variants names it or with --with_optional


@dataclasses.dataclass(frozen=True)
class Effect:
    """The paper's comparison: `choice` (the paper's component) minus `alternative`, in AP points."""

    label: str
    choice: str
    alternative: str
    # The paper's effect where it is not the difference of the two rows' numbers (e.g. a deeper ResNet than ours).
    paper: Mapping[str, float] | None = None
    paper_note: str = ""


@dataclasses.dataclass(frozen=True)
class Study:
    key: str
    title: str
    config: str
    task: str  # "segm" (mask AP) or "keypoints" (AP^kp): the metric the effects and the pilot use
    setting: str  # the paper's setting
    note: str  # ours, and why
    variants: tuple[Variant, ...]
    effects: tuple[Effect, ...]
    effect_metrics: tuple[str, ...]
    pair: tuple[str, str] | None = None  # (RoIAlign, RoIPool) variants the notebook shows side by side

    @property
    def baseline(self) -> Variant:
        return self.variants[0]

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(f"study {self.key} has no variant {name!r}")

    def config_of(self, variant: Variant) -> str:
        return variant.config or self.config


def _paper(ap, ap50=None, ap75=None, prefix="segm", box=None):
    """A paper row's numbers: {prefix_AP, prefix_AP50, prefix_AP75} (and box AP, AP50, AP75), Nones left out."""
    row = {f"{prefix}_AP": ap, f"{prefix}_AP50": ap50, f"{prefix}_AP75": ap75}
    if box is not None:
        row.update(zip(("bbox_AP", "bbox_AP50", "bbox_AP75"), box))
    return {k: v for k, v in row.items() if v is not None}


MASK_METRICS = ("segm_AP", "segm_AP50", "segm_AP75")
BOX_METRICS = ("bbox_AP", "bbox_AP50", "bbox_AP75")
KEYPOINT_METRICS = ("keypoints_AP", "keypoints_AP50", "keypoints_AP75")
PRIMARY_METRIC = {"segm": "segm_AP", "keypoints": "keypoints_AP"}
TABLE_METRICS = {"segm": MASK_METRICS + BOX_METRICS, "keypoints": KEYPOINT_METRICS + BOX_METRICS + ("segm_AP",)}
METRIC_LABELS = {"segm_AP": "mask AP", "segm_AP50": "mask AP50", "segm_AP75": "mask AP75",
                 "bbox_AP": "box AP", "bbox_AP50": "box AP50", "bbox_AP75": "box AP75",
                 "keypoints_AP": "AP^kp", "keypoints_AP50": "AP^kp50", "keypoints_AP75": "AP^kp75"}

R50_C4 = _paper(30.3, 51.2, 31.5)  # Table 2a-c: ResNet-50-C4 with RoIAlign (avg) and sigmoid masks
R50_FPN = _paper(33.6, 55.2, 35.3)  # Table 2a, 2e

FPN = "configs/ablations_fpn.py"
C4 = "configs/ablations_c4.py"
C5 = "configs/ablations_c5.py"
KEYPOINTS = "configs/ablations_keypoints.py"

STUDIES: dict[str, Study] = {s.key: s for s in (
    Study(
        key="2a", title="Table 2a: backbone architecture", config=FPN, task="segm",
        setting="ResNet-50/101-C4, ResNet-50/101-FPN, ResNeXt-101-FPN, pretrained on ImageNet",
        note="ResNet-18 and -34 with GroupNorm from scratch stand in for ResNet-50 and -101 (the CPU budget); "
             "C4 is the same run as 2c's RoIAlign (avg) row. ResNeXt (optional): ResNeXt-50 32x4d against "
             "ResNet-50, the paper's ResNeXt-101 against ResNet-101.",
        variants=(
            Variant("fpn_r18", "ResNet-18-FPN", paper_row="ResNet-50-FPN", paper=R50_FPN),
            Variant("fpn_r34", "ResNet-34-FPN", {"model.backbone.depth": "34"}, paper_row="ResNet-101-FPN",
                    paper=_paper(35.4, 57.3, 37.5)),
            Variant("c4_r18", "ResNet-18-C4", config=C4, paper_row="ResNet-50-C4", paper=R50_C4),
            Variant("c4_r34", "ResNet-34-C4", {"model.backbone.depth": "34"}, config=C4,
                    paper_row="ResNet-101-C4", paper=_paper(32.7, 54.2, 34.3), optional=True),
            Variant("fpn_r50", "ResNet-50-FPN", {"model.backbone.depth": "50"}, optional=True),
            Variant("fpn_x50", "ResNeXt-50-FPN (32x4d)", {"model.backbone.depth": "50", "model.backbone.groups": "32",
                                                         "model.backbone.width_per_group": "4"},
                    paper_row="ResNeXt-101-FPN", paper=_paper(36.7, 59.5, 38.9), optional=True),
        ),
        effects=(
            Effect("FPN vs C4", "fpn_r18", "c4_r18", paper_note="ResNet-50"),
            Effect("deeper (FPN): R34 vs R18", "fpn_r34", "fpn_r18", paper_note="ResNet-101 vs -50"),
            Effect("deeper (C4): R34 vs R18", "c4_r34", "c4_r18", paper_note="ResNet-101 vs -50"),
            Effect("ResNeXt vs ResNet (FPN)", "fpn_x50", "fpn_r50", paper=_paper(1.3, 2.2, 1.4),
                   paper_note="ResNeXt-101 vs ResNet-101: 36.7 vs 35.4"),
        ),
        effect_metrics=MASK_METRICS,
    ),
    Study(
        key="2b", title="Table 2b: multinomial vs independent masks; class-specific vs class-agnostic",
        config=FPN, task="segm", setting="ResNet-50-C4 (class-agnostic: Section 4.2, mask AP only)",
        note="On FPN rather than C4: C4's res5 on every RoI makes a C4 run about 3x an FPN run on this CPU, and "
             "2c already spends five C4 rows. The loss and the mask channel do not depend on the backbone.",
        variants=(
            Variant("sigmoid", "per-class sigmoid (independent)", paper_row="sigmoid", paper=R50_C4),
            Variant("softmax", "per-pixel softmax (multinomial)", {"model.roi_heads.mask_loss": "softmax"},
                    paper_row="softmax", paper=_paper(24.8, 44.1, 25.1)),
            Variant("class_agnostic", "class-agnostic sigmoid", {"model.roi_heads.class_agnostic_mask": "True"},
                    paper_row="class-agnostic (text)", paper=_paper(29.7)),
        ),
        effects=(
            Effect("independent (sigmoid) vs multinomial (softmax)", "sigmoid", "softmax"),
            Effect("class-specific vs class-agnostic", "sigmoid", "class_agnostic"),
        ),
        effect_metrics=MASK_METRICS,
    ),
    Study(
        key="2c", title="Table 2c: RoI layers on C4 (stride 16)", config=C4, task="segm",
        setting="ResNet-50-C4, stride 16",
        note="ResNet-18-C4 on the 320-pixel canvas: C4 is a 20 x 20 grid of 16-pixel cells against shapes of "
             "20-120 pixels (configs/ablations_c4.py).",
        variants=(
            Variant("align_avg", "RoIAlign, avg", paper_row="RoIAlign ave", paper=R50_C4),
            Variant("align_max", "RoIAlign, max", {"model.roi_heads.roi_reduce": "max"}, paper_row="RoIAlign max",
                    paper=_paper(30.2, 51.0, 31.8)),
            Variant("warp_avg", "RoIWarp, avg", {"model.roi_heads.roi_op": "warp", "model.roi_heads.roi_reduce": "avg"},
                    paper_row="RoIWarp ave", paper=_paper(27.1, 48.9, 27.1)),
            Variant("warp_max", "RoIWarp, max", {"model.roi_heads.roi_op": "warp", "model.roi_heads.roi_reduce": "max"},
                    paper_row="RoIWarp max", paper=_paper(27.2, 49.2, 27.1)),
            Variant("pool", "RoIPool (max)", {"model.roi_heads.roi_op": "pool"}, paper_row="RoIPool",
                    paper=_paper(26.9, 48.8, 26.4)),
        ),
        effects=(
            Effect("RoIAlign vs RoIPool", "align_avg", "pool"),
            Effect("RoIAlign vs RoIWarp (avg)", "align_avg", "warp_avg"),
            Effect("RoIAlign vs RoIWarp (max)", "align_max", "warp_max"),
            Effect("bilinear without alignment: RoIWarp (max) vs RoIPool", "warp_max", "pool"),
            Effect("RoIAlign avg vs max", "align_avg", "align_max"),
        ),
        effect_metrics=MASK_METRICS,
        pair=("align_avg", "pool"),
    ),
    Study(
        key="2d", title="Table 2d: RoIAlign vs RoIPool on C5 (stride 32)", config=C5, task="segm",
        setting="ResNet-50-C5, stride 32, the FPN heads on C5; mask and box AP",
        note="ResNet-18-C5 on the 320-pixel canvas: a 10 x 10 grid of 32-pixel cells against shapes of 20-120 "
             "pixels (configs/ablations_c5.py). Optional: RoIAlign without the half-pixel offset (the paper's "
             "RoIAlign had none; detectron2's ROIAlignV2, our default, adds it).",
        variants=(
            Variant("align", "RoIAlign", paper_row="RoIAlign", paper=_paper(30.9, 51.8, 32.1, box=(34.0, 55.3, 36.4))),
            Variant("pool", "RoIPool", {"model.roi_heads.roi_op": "pool"}, paper_row="RoIPool",
                    paper=_paper(23.6, 46.5, 21.6, box=(28.2, 52.7, 26.9))),
            Variant("align_unaligned", "RoIAlign, aligned=False", {"model.roi_heads.aligned": "False"},
                    optional=True),
        ),
        effects=(
            Effect("RoIAlign vs RoIPool", "align", "pool"),
            Effect("half-pixel offset: aligned=True vs False", "align", "align_unaligned",
                   paper_note="not in the paper"),
        ),
        effect_metrics=MASK_METRICS + BOX_METRICS,
        pair=("align", "pool"),
    ),
    Study(
        key="2e", title="Table 2e: mask branch, FCN vs MLP (FPN)", config=FPN, task="segm",
        setting="ResNet-50-FPN; MLP fc 1024 -> 1024 -> 80x28x28, FCN 4 convs of 256",
        note="ResNet-18-FPN; MLP fc 256 -> 256 -> 6x28x28 (roi_heads.fc_dim), FCN 2 convs of 64 (shapes.py's "
             "head). The FCN row is the same run as 2a's ResNet-18-FPN row.",
        variants=(
            Variant("fcn", "FCN mask head", paper_row="FCN", paper=R50_FPN),
            Variant("mlp", "MLP mask head", {"model.roi_heads.mask_head": "mlp"}, paper_row="MLP fc 1024-1024",
                    paper=_paper(31.5, 53.7, 32.8)),
        ),
        effects=(Effect("FCN vs MLP", "fcn", "mlp"),),
        effect_metrics=MASK_METRICS,
    ),
    Study(
        key="t6", title="Table 6: RoIAlign vs RoIPool for keypoints (FPN)", config=KEYPOINTS, task="keypoints",
        setting="ResNet-50-FPN, COCO person keypoints, AP^kp (OKS)",
        note="ResNet-18-FPN on the generated stick figures (13 joints, configs/ablations_keypoints.py); AP^kp "
             "with the figures' OKS sigmas.",
        variants=(
            Variant("align", "RoIAlign", paper_row="RoIAlign", paper=_paper(64.2, 86.6, 69.7, prefix="keypoints")),
            Variant("pool", "RoIPool", {"model.roi_heads.roi_op": "pool"}, paper_row="RoIPool",
                    paper=_paper(59.8, 86.2, 66.7, prefix="keypoints")),
        ),
        effects=(Effect("RoIAlign vs RoIPool", "align", "pool"),),
        effect_metrics=KEYPOINT_METRICS,
        pair=("align", "pool"),
    ),
)}


def paper_effect(study: Study, effect: Effect) -> dict[str, float | None]:
    """metric -> the paper's effect in points (choice minus alternative), None where the paper has no number."""
    if effect.paper is not None:
        return {m: effect.paper.get(m) for m in study.effect_metrics}
    choice, alternative = study.variant(effect.choice).paper or {}, study.variant(effect.alternative).paper or {}
    return {m: round(choice[m] - alternative[m], 1) if m in choice and m in alternative else None
            for m in study.effect_metrics}


def study_json(study: Study) -> dict[str, Any]:
    """A study as results.json holds it (the notebook reads the studies from there, not from this file)."""
    out = dataclasses.asdict(study)
    out["variants"] = [{**dataclasses.asdict(v), "config": study.config_of(v), "overrides": dict(v.overrides),
                        "paper": dict(v.paper) if v.paper else None} for v in study.variants]
    out["effects"] = [{**dataclasses.asdict(e), "paper": paper_effect(study, e)} for e in study.effects]
    return out


# ----------------------------------------------------------------------------------------------------
# Runs: identity, budget, command, record.

RUN_RECORD = "ablation_run.json"
CHART_NAME = "ablations.png"
RESULTS_NAME = "results.json"
PILOT_NAME = "pilot.json"
# What a run's code is: a change here is a change of the experiment (the report's outputs are not).
CODE_PATHS = ("maskrcnn_jax", "configs", "experiments/ablations.py", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One trained model up to its seed: a config file and its overrides (variant's, not budget or seed)."""

    config: str
    overrides: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, config: str, overrides: Mapping[str, str]) -> "RunSpec":
        return cls(config, tuple(sorted(overrides.items())))

    @property
    def name(self) -> str:
        """<config stem>/<overrides>: the folder of its runs, the same for every study naming it."""
        stem = os.path.splitext(os.path.basename(self.config))[0]
        if not self.overrides:
            return f"{stem}/base"
        text = "+".join(f"{key.split('.')[-1]}={value}" for key, value in self.overrides)
        return f"{stem}/" + re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def select(studies: Mapping[str, Study], keys: Sequence[str], variants: Sequence[str] = (),
           with_optional: bool = False) -> list[tuple[Study, Variant]]:
    """(study, variant) pairs of the chosen studies: every non-optional variant (and the optional ones with
    with_optional), or only those `variants` names ("study:variant", or a variant name in any chosen study)."""
    chosen = []
    for key in keys:
        study = studies[key]
        for variant in study.variants:
            if variants:
                if f"{key}:{variant.name}" in variants or variant.name in variants:
                    chosen.append((study, variant))
            elif with_optional or not variant.optional:
                chosen.append((study, variant))
    return chosen


def unique_runs(pairs: Iterable[tuple[Study, Variant]]) -> list[RunSpec]:
    seen: dict[RunSpec, None] = {}
    for study, variant in pairs:
        seen.setdefault(RunSpec.of(study.config_of(variant), variant.overrides), None)
    return list(seen)


def absolute(config_path: str) -> str:
    return config_path if os.path.isabs(config_path) else os.path.join(ROOT, config_path)


def load_config(config_path: str):
    """get_config() of a config file, as --config=PATH gives it."""
    from maskrcnn_jax import config as config_lib

    return config_lib.load(absolute(config_path))


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


def split_budget(config_path: str, num_steps: int | None, extra: Mapping[str, str]
                 ) -> tuple[dict[str, str], dict[str, str]]:
    """(the budget's overrides, the other extra overrides): an explicit --config.train.warmup_steps or lr_steps among
    `extra` wins over the scaled one (the steps themselves are --num_steps, see parse_args)."""
    budget = budget_overrides(config_path, num_steps)
    budget.update({k: v for k, v in extra.items() if k in budget})
    return budget, {k: v for k, v in extra.items() if k not in budget}


def smoke_overrides(config_path: str, runs_dir: str, num_steps: int) -> dict[str, str]:
    """--smoke: 16 training and 8 validation images of the config's own generated dataset, written and built under
    RUNS_DIR/smoke_data; progress lines every 5 steps (the seconds per step the estimate reads)."""
    data = load_config(config_path).data
    section = next((name for name in ("shapes", "stick_figures") if data[name].num_train > 0), None)
    if section is None:
        raise SystemExit(f"--smoke needs a generated dataset; {config_path} reads files")
    base = os.path.join(os.path.abspath(runs_dir), "smoke_data")
    return {f"data.{section}.num_train": "16", f"data.{section}.num_val": "8",
            f"data.{section}.dir": os.path.join(base, section), "data.data_dir": os.path.join(base, "tfds"),
            "train.log_every": "5", "train.checkpoint_every": str(num_steps), "eval.num_overlays": "0"}


def run_overrides(spec: RunSpec, seed: int, budget: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """Every override of one run, each key once: budget, then the caller's extras, then seeds and the variant."""
    return {**budget, **extra, "train.seed": str(seed), "data.seed": str(seed), **dict(spec.overrides)}


def run_command(config_path: str, workdir: str, overrides: Mapping[str, str]) -> list[str]:
    return ([sys.executable, "-m", "maskrcnn_jax.main", f"--config={config_path}", f"--workdir={workdir}"]
            + [f"--config.{key}={value}" for key, value in overrides.items()])


def run_dir(runs_dir: str, spec: RunSpec, num_steps: int, seed: int) -> str:
    return os.path.join(runs_dir, spec.name, f"steps{num_steps}", f"seed{seed}")


def final_metrics(workdir: str, num_steps: int) -> dict[str, float] | None:
    """The eval_metrics.jsonl line at `num_steps` (the last one if several), or None: the run is not finished."""
    from maskrcnn_jax.engine import workdir as workdir_lib

    found = [record for record in workdir_lib.read_eval_metrics(workdir) if int(record["step"]) == num_steps]
    return found[-1] if found else None


def read_record(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, RUN_RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_same_run(workdir: str, overrides: Mapping[str, str], config_path: str) -> None:
    """A workdir belongs to one (config, overrides): resuming it under another budget would mix two schedules."""
    record = read_record(workdir)
    if record is None:
        return
    if record["overrides"] != dict(overrides) or record["config"] != config_path:
        raise SystemExit(f"{workdir} was started with config {record['config']} and overrides "
                         f"{record['overrides']}, not {config_path} and {dict(overrides)}: delete it or choose "
                         f"another --runs_dir")


def _git(*args: str) -> str:
    try:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def code_state() -> dict[str, Any]:
    """{'commit', 'code_tree', 'clean', 'changed'}: HEAD, a hash of CODE_PATHS' trees at HEAD (two commits that
    differ only in results share it), and whether CODE_PATHS have uncommitted or untracked changes."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {"commit": "unknown (not a git checkout)", "code_tree": None, "clean": False, "changed": ["?"]}
    trees = " ".join(_git("rev-parse", f"HEAD:{path}") for path in CODE_PATHS)
    changed = [line[3:] for line in _git("status", "--porcelain", "--", *CODE_PATHS).splitlines() if line.strip()]
    return {"commit": commit, "code_tree": hashlib.sha1(trees.encode()).hexdigest()[:12], "clean": not changed,
            "changed": changed}


def execute_run(config_path: str, workdir: str, overrides: Mapping[str, str], env: Mapping[str, str],
                code: Mapping[str, Any], variant_overrides: Mapping[str, str] = {}, smoke: bool = False) -> float:
    """Runs maskrcnn_jax.main to the end (its log in WORKDIR/train.log); returns the wall time in seconds. The run
    record gains one attempt: wall and CPU seconds (this process' children: the run), commit, code tree, clean."""
    os.makedirs(workdir, exist_ok=True)
    record_path = os.path.join(workdir, RUN_RECORD)
    record = read_record(workdir) or {"config": config_path, "overrides": dict(overrides),
                                      "variant_overrides": dict(variant_overrides), "smoke": smoke,
                                      "seconds": [], "attempts": []}
    record.setdefault("attempts", [])
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    command = run_command(config_path, workdir, overrides)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(os.path.join(workdir, "train.log"), "a") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        result = subprocess.run(command, cwd=ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    record["seconds"].append(round(seconds, 1))  # one entry per attempt; a resumed run has several
    record["attempts"].append({"commit": code["commit"], "code_tree": code["code_tree"], "clean": code["clean"],
                               "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                               "cores": os.cpu_count(), "exit": result.returncode,
                               "ended": time.strftime("%Y-%m-%dT%H:%M:%S")})
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
# Reading runs back: metrics, provenance, timing.

PROGRESS_LINE = re.compile(r"step (\d+)/(\d+) .*\| ([0-9.]+) img/s")


def step_seconds(workdir: str, batch_size: int) -> float | None:
    """Seconds per training step from the progress lines of WORKDIR/logs/log.txt: the median over the windows after
    the first (which holds the compile), or the only window."""
    path = os.path.join(workdir, "logs", "log.txt")
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        rates = [float(m.group(3)) for m in map(PROGRESS_LINE.search, f) if m]
    rates = [r for r in rates if r > 0]
    if not rates:
        return None
    rates = rates[1:] if len(rates) > 1 else rates
    return batch_size / float(np.median(rates))


def provenance(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """commit, code tree and clean over a run's attempts: clean only if every attempt was, on one code tree."""
    attempts = (record or {}).get("attempts") or []
    if not attempts:
        return {"commit": None, "code_tree": None, "clean": False, "wall_seconds": sum((record or {}).get("seconds", [])),
                "cpu_seconds": None}
    trees = {a["code_tree"] for a in attempts}
    return {"commit": attempts[-1]["commit"], "code_tree": attempts[-1]["code_tree"],
            "clean": all(a["clean"] for a in attempts) and len(trees) == 1,
            "wall_seconds": sum(a["seconds"] for a in attempts),
            "cpu_seconds": sum(a.get("cpu_seconds") or 0.0 for a in attempts)}


def recorded_runs(results_dir: str, num_steps: int, extra: Mapping[str, str]) -> dict[tuple[str, int], dict]:
    """{(run, seed): entry} of the finished runs that results_dir's results.json records at this budget and these
    extra overrides: what the report keeps of a run whose workdir is gone."""
    path = os.path.join(results_dir, RESULTS_NAME)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        previous = json.load(f)
    if (previous.get("budget") or {}).get("num_steps") != num_steps or previous.get("extra_overrides") != dict(extra):
        return {}
    return {(r["run"], r["seed"]): r for r in previous.get("runs", []) if r.get("metrics") is not None}


def collect(runs_dir: str, specs: Sequence[RunSpec], seeds: Sequence[int], num_steps: int, results_dir: str,
            allow_dirty: bool, recorded: Mapping[tuple[str, int], Mapping[str, Any]] = {}) -> list[dict[str, Any]]:
    """Per (run, seed): its final metrics (None when unfinished), minutes, provenance, whether the report counts it
    (finished, and clean unless allow_dirty), and where its overlays are (relative to results_dir). A run that is
    not finished in its workdir but is in `recorded` is that record (marked "recorded": its workdir is gone)."""
    runs = []
    for spec in specs:
        for seed in seeds:
            workdir = run_dir(runs_dir, spec, num_steps, seed)
            metrics = final_metrics(workdir, num_steps)
            if metrics is None and (spec.name, seed) in recorded:
                entry = dict(recorded[spec.name, seed])
                entry["included"] = entry["clean"] or allow_dirty
                entry["recorded"] = True
                if entry.get("overlays") and not os.path.isdir(os.path.join(results_dir, entry["overlays"])):
                    entry["overlays"] = None
                runs.append(entry)
                continue
            origin = provenance(read_record(workdir))
            overlays = os.path.join(workdir, "overlays", f"step_{num_steps:08d}")
            runs.append({
                "run": spec.name, "config": spec.config, "overrides": dict(spec.overrides), "seed": seed,
                "workdir": os.path.relpath(workdir, results_dir),
                "overlays": os.path.relpath(overlays, results_dir) if os.path.isdir(overlays) else None,
                "metrics": None if metrics is None else {k: v for k, v in metrics.items() if k != "step"},
                "minutes": round(origin["wall_seconds"] / 60.0, 2) or None,
                "cpu_minutes": None if origin["cpu_seconds"] is None else round(origin["cpu_seconds"] / 60.0, 2),
                "commit": origin["commit"], "code_tree": origin["code_tree"], "clean": origin["clean"],
                "included": metrics is not None and (origin["clean"] or allow_dirty),
                "recorded": False,
            })
    return runs


# ----------------------------------------------------------------------------------------------------
# Summary and effects.


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for a single value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else float("nan")


def summarize_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """{'n', 'seeds', metric: {'mean', 'std', 'values'}} in percent over the included runs (each metric they all
    have); 'values' follow 'seeds'."""
    included = [r for r in runs if r["included"]]
    entry: dict[str, Any] = {"n": len(included), "seeds": [r["seed"] for r in included]}
    if included:
        for key in included[0]["metrics"]:
            values = [r["metrics"].get(key) for r in included]
            if all(isinstance(v, (int, float)) and v >= 0 for v in values):
                points = [100.0 * v for v in values]
                mean, std = mean_std(points)
                entry[key] = {"mean": mean, "std": std, "values": points}
    return entry


def difference(a: Mapping[str, Any], b: Mapping[str, Any], metric: str) -> dict[str, Any] | None:
    """mean_a - mean_b with its standard error. Runs of one seed share the initialisation of every layer the two
    variants share and the data order, so where both ran the same seeds (at least 2) the SE is that of the mean of
    the per-seed differences, std(a_i - b_i) / sqrt(n) ('paired'); otherwise sqrt(s_a^2/n_a + s_b^2/n_b). Both are
    returned: {'delta', 'se', 'paired', 'se_unpaired'}; SEs are NaN with a single seed."""
    if not a.get("n") or not b.get("n") or metric not in a or metric not in b:
        return None
    delta = a[metric]["mean"] - b[metric]["mean"]
    unpaired = (float("nan") if a["n"] < 2 or b["n"] < 2 else
                math.sqrt(a[metric]["std"] ** 2 / a["n"] + b[metric]["std"] ** 2 / b["n"]))
    paired = a["n"] >= 2 and list(a["seeds"]) == list(b["seeds"]) and "values" in a[metric] and "values" in b[metric]
    se = unpaired
    if paired:
        differences = np.subtract(a[metric]["values"], b[metric]["values"])
        se = float(differences.std(ddof=1) / math.sqrt(differences.size))
    return {"delta": delta, "se": se, "paired": paired, "se_unpaired": unpaired}


PAPER_NO_EFFECT = 0.5  # points: the paper's differences this small it calls none (e.g. RoIAlign avg vs max, 0.1)


def verdict(delta: float | None, se: float | None, paper: float | None) -> str:
    """A plain word on one measured effect: resolved (|delta| > 2 SE) or not, and its sign against the paper's."""
    if delta is None:
        return "not measured"
    if se is None or math.isnan(se):
        return "no SE (one seed)"
    resolved = abs(delta) > 2 * se
    if paper is None:
        return "resolved (no paper number)" if resolved else "not resolved (no paper number)"
    if abs(paper) < PAPER_NO_EFFECT:
        return "resolved, but the paper finds none" if resolved else "not resolved; the paper finds none either"
    if not resolved:
        return "not resolved (within 2 SE)"
    return "resolved, same sign as the paper" if (delta > 0) == (paper > 0) else "resolved, OPPOSITE sign to the paper"


def study_results(study: Study, variants: Sequence[str], runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The study with each chosen variant's summary and each effect's measured difference per metric."""
    out = study_json(study)
    by_run = {}
    for run in runs:
        by_run.setdefault(run["run"], []).append(run)
    summaries = {}
    for entry in out["variants"]:
        spec = RunSpec.of(entry["config"], entry["overrides"])
        entry["run"] = spec.name
        entry["chosen"] = entry["name"] in variants
        entry["summary"] = summarize_runs(by_run.get(spec.name, [])) if entry["chosen"] else {"n": 0, "seeds": []}
        summaries[entry["name"]] = entry["summary"]
    for effect in out["effects"]:
        effect["measured"] = {}
        for metric in study.effect_metrics:
            found = difference(summaries[effect["choice"]], summaries[effect["alternative"]], metric) or {
                "delta": None, "se": None, "paired": False, "se_unpaired": None}
            found["verdict"] = verdict(found["delta"], found["se"], effect["paper"].get(metric))
            effect["measured"][metric] = found
    return out


# ----------------------------------------------------------------------------------------------------
# The report: results.json, the chart and RESULTS.md (three blocks between markers).

SUITE_BEGIN = "<!-- suite: written by experiments/ablations.py -->"
SUITE_END = "<!-- end of suite -->"
PILOT_BEGIN = "<!-- pilot: written by experiments/ablations.py --pilot -->"
PILOT_END = "<!-- end of pilot -->"
ANALYSIS_BEGIN = "<!-- analysis: written by hand, kept by the runner -->"
ANALYSIS_END = "<!-- end of analysis -->"
SUITE_PLACEHOLDER = "_The suite has not run yet: `.venv/bin/python experiments/ablations.py` writes this block._"
PILOT_PLACEHOLDER = "_The pilot has not run yet: `.venv/bin/python experiments/ablations.py --pilot` writes this block._"
ANALYSIS_PLACEHOLDER = "_Not written yet: the analysis is written by hand once the runs above exist._"


def read_block(report_path: str, begin: str, end: str, placeholder: str) -> str:
    """The text between two markers of an existing report, or the placeholder."""
    if os.path.exists(report_path):
        with open(report_path) as f:
            text = f.read()
        if begin in text and end in text.split(begin, 1)[1]:
            return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")
    return placeholder


def write_markdown(report_path: str, suite: str | None = None, pilot: str | None = None) -> None:
    """Rewrites the report with a new suite or pilot block, keeping the other one and the analysis as they are."""
    suite = suite if suite is not None else read_block(report_path, SUITE_BEGIN, SUITE_END, SUITE_PLACEHOLDER)
    pilot = pilot if pilot is not None else read_block(report_path, PILOT_BEGIN, PILOT_END, PILOT_PLACEHOLDER)
    analysis = read_block(report_path, ANALYSIS_BEGIN, ANALYSIS_END, ANALYSIS_PLACEHOLDER)
    text = "\n".join([
        "# Mask R-CNN ablations: the paper's Table 2 (a-e) and Table 6 on generated data", "",
        "Written by `experiments/ablations.py` (the studies, variants and the paper's numbers are its `STUDIES`; "
        "experiments/README.md says how to run it). Three blocks: the suite's results, the pilot that chose their "
        "budget, and the analysis, written by hand.", "",
        SUITE_BEGIN, suite, SUITE_END, "",
        "## Pilot: seed-to-seed noise and the budget", "",
        PILOT_BEGIN, pilot, PILOT_END, "",
        "## Analysis", "",
        ANALYSIS_BEGIN, analysis, ANALYSIS_END, ""])
    os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    with open(report_path, "w") as f:
        f.write(text)


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


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    return "n/a" if math.isnan(value) else f"{value:.1f}"


def _unpaired_mark(measured: Mapping[str, Any]) -> str:
    """' ‡' after an effect whose SE is unpaired (the two variants did not run the same seeds)."""
    return " ‡" if measured["delta"] is not None and not measured["paired"] else ""


def format_suite(results: Mapping[str, Any]) -> str:
    budget = results["budget"]
    runs = results["runs"]
    code = results["code"]
    dirty_included = [r for r in runs if r["included"] and not r["clean"]]
    left_out = [r for r in runs if r["metrics"] is not None and not r["included"]]
    missing = [r for r in runs if r["metrics"] is None]
    lines = [
        "## Setting", "",
        f"Every run trains from scratch for **{budget['num_steps']} steps** of {budget['batch_size']} images (warmup "
        f"{budget['warmup_steps']} steps, learning rate ×{budget['lr_gamma']} at step(s) "
        f"{', '.join(str(s) for s in budget['lr_steps'])}) and is evaluated once at the end on the validation split "
        "(COCO AP@[.5:.95], AP50, AP75 in percent). Mean ± sample standard deviation over seeds "
        f"{', '.join(str(s) for s in results['seeds'])}; the seed sets `train.seed` (initialisation, RoI sampling) "
        "and `data.seed` (shuffling, flips). Each effect is the paper's choice minus the alternative, ± its standard "
        "error: variants that ran the same seeds share the initialisation of their common layers and the data order, "
        "so the SE is that of the mean of the per-seed differences, std(a_i − b_i)/sqrt(n) (paired); where the seeds "
        "differ, sqrt(s1²/n1 + s2²/n2) (marked ‡). Each study's table also gives the unpaired SE. **resolved** means "
        "|effect| > 2 SE. "
        f"The paper's numbers: {PAPER}.", "",
        f"**Code:** {code['summary']}", "",
        "**Command:**", "", "```sh", results["command"], "```", ""]
    if dirty_included:
        lines += [f"**Warning: {len(dirty_included)} run(s) counted here ran on an edited tree (--allow_dirty); "
                  "they are marked † and this report is not a result.**", ""]
    if left_out:
        lines += ["**Left out (edited tree or unknown commit):** "
                  + ", ".join(f"{r['run']} seed {r['seed']}" for r in left_out) + ".", ""]
    recorded = [r for r in runs if r.get("recorded")]
    if recorded:
        lines += [f"**{len(recorded)} run(s) are carried from the committed results.json** (their workdirs are gone; "
                  "metrics and provenance as recorded when they finished): "
                  + "; ".join(f"{run} seed(s) {', '.join(str(r['seed']) for r in recorded if r['run'] == run)}"
                              for run in dict.fromkeys(r["run"] for r in recorded)) + ".", ""]
    if missing:
        lines += ["**Not finished (not in the tables):** "
                  + ", ".join(f"{r['run']} seed {r['seed']}" for r in missing) + ".", ""]

    lines += ["## Every effect beside the paper", "",
              f"On each study's main metric (mask AP; AP^kp for Table 6). Per metric, and AP50 / AP75, in the "
              "study's section below.", "",
              "| study | effect | paper | measured | verdict |", "| --- | --- | ---: | ---: | --- |"]
    for study in results["studies"]:
        primary = PRIMARY_METRIC[study["task"]]
        for effect in study["effects"]:
            measured = effect["measured"][primary]
            if measured["delta"] is None and not all(
                    v["chosen"] for v in study["variants"] if v["name"] in (effect["choice"], effect["alternative"])):
                continue  # an optional row that was not run
            paper = _signed(effect["paper"].get(primary))
            if effect["paper_note"]:
                paper += f" ({effect['paper_note']})"
            lines.append(f"| {study['key']} | {effect['label']} | {paper} | "
                         f"{_signed(measured['delta'], measured['se'])}{_unpaired_mark(measured)} | "
                         f"{measured['verdict']} |")
    lines.append("")
    if results.get("chart"):
        lines += [f"![every study beside the paper]({results['chart']})", ""]

    for study in results["studies"]:
        metrics = [m for m in TABLE_METRICS[study["task"]]]
        lines += [f"## {study['title']}", "",
                  f"Paper: {study['setting']}. Here: `{study['config']}`; {study['note']}", "",
                  "| variant | overrides | paper row | seeds | " + " | ".join(METRIC_LABELS.get(m, m) for m in metrics)
                  + " | paper " + " / ".join(METRIC_LABELS[m] for m in study["effect_metrics"])
                  + " | min per run |",
                  "| --- | --- | --- | ---: | " + " | ".join("---:" for _ in metrics) + " | ---: | ---: |"]
        for variant in study["variants"]:
            if not variant["chosen"]:
                continue
            summary = variant["summary"]
            overrides = ", ".join(f"`{k}={v}`" for k, v in variant["overrides"].items()) or "(none)"
            if variant["config"] != study["config"]:
                overrides = f"`{variant['config']}` " + ("" if overrides == "(none)" else overrides)
            mine = [r for r in runs if r["run"] == variant["run"] and r["included"]]
            dagger = " †" if any(not r["clean"] for r in mine) else ""
            minutes = [r["minutes"] for r in mine if r["minutes"]]
            paper = variant["paper"] or {}
            cells = [f"{variant['name']}{dagger} ({variant['label']})", overrides, variant["paper_row"] or "–",
                     str(summary["n"]), *(_pm(summary.get(m)) for m in metrics),
                     " / ".join(_number(paper.get(m)) for m in study["effect_metrics"]),
                     f"{np.mean(minutes):.1f}" if minutes else "–"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "| effect | metric | paper | measured | unpaired SE | verdict |",
                  "| --- | --- | ---: | ---: | ---: | --- |"]
        for effect in study["effects"]:
            for metric in study["effect_metrics"]:
                measured = effect["measured"][metric]
                if measured["delta"] is None and not all(
                        v["chosen"] for v in study["variants"]
                        if v["name"] in (effect["choice"], effect["alternative"])):
                    continue
                lines.append(f"| {effect['label']} ({effect['choice']} − {effect['alternative']}) | "
                             f"{METRIC_LABELS[metric]} | {_signed(effect['paper'].get(metric))} | "
                             f"{_signed(measured['delta'], measured['se'])}{_unpaired_mark(measured)} | "
                             f"{_number(measured['se_unpaired'])} | {measured['verdict']} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def code_summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The commits and code trees of the counted runs, in words: one named commit is the goal."""
    counted = [r for r in runs if r["included"]]
    commits = sorted({r["commit"] for r in counted if r["commit"]})
    trees = sorted({r["code_tree"] for r in counted if r["code_tree"]})
    if not counted:
        text = "no finished run counted yet."
    elif len(trees) == 1:
        text = (f"every counted run ran commit {', '.join(c[:10] for c in commits)} "
                f"(code tree {trees[0]}: {', '.join(CODE_PATHS)})"
                + ("" if all(r["clean"] for r in counted) else ", some on an edited tree") + ".")
    else:
        text = (f"**the counted runs span {len(trees)} code versions** (commits {', '.join(c[:10] for c in commits)}); "
                "rerun the older ones or report them apart.")
    return {"commits": commits, "code_trees": trees, "clean": all(r["clean"] for r in counted),
            "summary": text}


def plot_studies(results: Mapping[str, Any], path: str | None = None, fig=None):
    """One panel per study: each variant's main AP (mean ± std, every seed a dot) beside the paper's number for its
    row (hatched); saved to `path` when given."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    studies = [s for s in results["studies"] if any(v["chosen"] for v in s["variants"])]
    columns = min(3, max(1, len(studies)))
    rows = math.ceil(len(studies) / columns)
    own = fig is None
    if own:
        fig = plt.figure(figsize=(5.2 * columns, 3.9 * rows))
    for index, study in enumerate(studies):
        ax = fig.add_subplot(rows, columns, index + 1)
        metric = PRIMARY_METRIC[study["task"]]
        variants = [v for v in study["variants"] if v["chosen"]]
        x = np.arange(len(variants))
        means = [v["summary"].get(metric, {}).get("mean", np.nan) for v in variants]
        stds = [np.nan_to_num(v["summary"].get(metric, {}).get("std", 0.0)) for v in variants]
        paper = [(v["paper"] or {}).get(metric, np.nan) for v in variants]
        ax.bar(x - 0.2, means, 0.4, yerr=stds, capsize=3, label="measured (generated data)", color="tab:blue")
        ax.bar(x + 0.2, paper, 0.4, label="paper (COCO)", color="white", edgecolor="tab:orange", hatch="//")
        for i, variant in enumerate(variants):
            seeds = [100.0 * r["metrics"][metric] for r in results["runs"]
                     if r["run"] == variant["run"] and r["included"] and metric in r["metrics"]]
            ax.plot(np.full(len(seeds), x[i] - 0.2), seeds, "k.", markersize=4)
        ax.set_xticks(x, [v["name"] for v in variants], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(METRIC_LABELS[metric] + " (%)")
        ax.set_title(study["title"], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        top = np.nanmax(np.asarray(means + paper + [1.0], dtype=float))
        ax.set_ylim(0, 1.25 * top)
        if index == 0:
            ax.legend(loc="upper right", fontsize=7)
    fig.suptitle(f"{results['budget']['num_steps']} steps, seeds {results['seeds']}: mean ± std (dots: seeds) "
                 "beside the paper", fontsize=10)
    fig.tight_layout()
    if own and path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def plot_effects(results: Mapping[str, Any], ax=None):
    """Every measured effect on its study's main metric, ± 2 SE, beside the paper's effect."""
    import matplotlib.pyplot as plt

    rows = []
    for study in results["studies"]:
        primary = PRIMARY_METRIC[study["task"]]
        for effect in study["effects"]:
            measured = effect["measured"][primary]
            if measured["delta"] is not None:
                rows.append((f"{study['key']}: {effect['label']}", measured["delta"],
                             np.nan_to_num(2 * (measured["se"] if measured["se"] is not None else np.nan)),
                             effect["paper"].get(primary)))
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    y = np.arange(len(rows))
    ax.barh(y + 0.2, [r[1] for r in rows], 0.4, xerr=[r[2] for r in rows], capsize=3,
            label="measured ± 2 SE (generated data)")
    ax.barh(y - 0.2, [np.nan if r[3] is None else r[3] for r in rows], 0.4, label="paper (COCO)",
            color="white", edgecolor="tab:orange", hatch="//")
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("effect: the paper's choice minus the alternative (AP points)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return ax


def write_report(out_path: str, results: Mapping[str, Any]) -> dict[str, Any]:
    """Writes the chart (once a run counts), results.json and the report's suite block; returns what it wrote."""
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    results = dict(results)
    if any(r["included"] for r in results["runs"]):
        plot_studies(results, os.path.join(out_dir, CHART_NAME))
        results["chart"] = CHART_NAME
    with open(os.path.join(out_dir, RESULTS_NAME), "w") as f:
        json.dump(results, f, indent=2)
    write_markdown(out_path, suite=format_suite(results))
    return results


def build_results(args: argparse.Namespace, argv: Sequence[str], pairs: Sequence[tuple[Study, Variant]],
                  specs: Sequence[RunSpec], budget: Mapping[str, str], extra: Mapping[str, str],
                  num_steps: int, recorded: Mapping[tuple[str, int], Mapping[str, Any]]) -> dict[str, Any]:
    results_dir = os.path.dirname(os.path.abspath(args.out))
    runs = collect(args.runs_dir, specs, args.seed_list, num_steps, results_dir, args.allow_dirty, recorded)
    chosen: dict[str, list[str]] = {}
    for study, variant in pairs:
        chosen.setdefault(study.key, []).append(variant.name)
    config = load_config(pairs[0][0].config)
    lr_steps = [int(s) for s in budget["train.lr_steps"].strip("()").split(",") if s.strip()]
    return {
        "paper": PAPER,
        "seeds": args.seed_list,
        "budget": {"num_steps": num_steps, "batch_size": int(extra.get("train.batch_size", config.train.batch_size)),
                   "warmup_steps": int(budget["train.warmup_steps"]), "lr_steps": lr_steps,
                   "lr_gamma": float(extra.get("train.lr_gamma", config.train.lr_gamma))},
        "extra_overrides": dict(extra),
        "allow_dirty": args.allow_dirty,
        "code": code_summary(runs),
        # --report_only is left out: the runs it reports are the ones the command without it produces (or skips).
        "command": shlex.join([".venv/bin/python", "experiments/ablations.py",
                               *(a for a in argv if a not in ("--report_only",))]),
        "studies": [study_results(args.studies_map[key], names, runs) for key, names in chosen.items()],
        "runs": runs,
    }


# ----------------------------------------------------------------------------------------------------
# The pilot: noise per budget, timing per run, and the suite's cost.

EFFECT_POINTS = 2.0  # the effect that should stand out...
STANDARD_ERRORS = 2.0  # ...at this many standard errors of a difference of two means
MIN_SEEDS = 3


def seeds_needed(std: float) -> int:
    """Seeds per variant for which EFFECT_POINTS is STANDARD_ERRORS x the SE of a difference of two means with this
    std each: z * std * sqrt(2 / n) <= effect, so n >= 2 (z std / effect)^2; at least MIN_SEEDS."""
    if std is None or math.isnan(std):
        return MIN_SEEDS
    return max(MIN_SEEDS, math.ceil(2.0 * (STANDARD_ERRORS * std / EFFECT_POINTS) ** 2 - 1e-9))


def timing_records(runs_dir: str) -> list[dict[str, Any]]:
    """Every run under RUNS_DIR with a successful attempt: its config and variant overrides, steps, smoke or not,
    wall and CPU seconds, and the seconds per step from its progress lines (None without two of them)."""
    found = []
    for folder, _, files in os.walk(runs_dir):
        if RUN_RECORD not in files:
            continue
        record = read_record(folder)
        attempts = [a for a in record.get("attempts", []) if a.get("exit", 0) == 0]
        if not attempts or "variant_overrides" not in record:
            continue
        try:
            num_steps = int(record["overrides"]["train.num_steps"])
        except (KeyError, ValueError):
            continue
        batch = record["overrides"].get("train.batch_size")
        if batch is None and os.path.exists(os.path.join(folder, "config.json")):
            with open(os.path.join(folder, "config.json")) as f:
                batch = json.load(f)["train"]["batch_size"]
        per_step = step_seconds(folder, int(batch)) if batch else None
        wall = sum(a["seconds"] for a in attempts)
        cpu = sum(a.get("cpu_seconds") or 0.0 for a in attempts)
        found.append({"config": record["config"], "variant": record["variant_overrides"],
                      "smoke": bool(record.get("smoke")), "num_steps": num_steps, "wall": wall, "cpu": cpu,
                      "step_seconds": per_step,
                      "overhead": None if per_step is None else max(0.0, wall - num_steps * per_step)})
    return found


def _median(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def run_cost(spec: RunSpec, timings: Sequence[Mapping[str, Any]], num_steps: int) -> dict[str, Any] | None:
    """Estimated wall and CPU seconds of one run of `spec` at num_steps: seconds per step from its own runs (smoke
    or not), else from its config's baseline runs; the fixed cost (data, compile, evaluation) from real (not smoke)
    runs of it, else of its config's baseline, else of any config; None when no run gives a number."""
    own = [t for t in timings if t["config"] == spec.config and t["variant"] == dict(spec.overrides)]
    base = [t for t in timings if t["config"] == spec.config and not t["variant"]]
    per_step = _median(t["step_seconds"] for t in own)
    source = "its own runs"
    if per_step is None:
        per_step, source = _median(t["step_seconds"] for t in base), "its config's baseline"
    real = ([t for t in own if not t["smoke"] and t["overhead"] is not None]
            or [t for t in base if not t["smoke"] and t["overhead"] is not None]
            or [t for t in timings if not t["smoke"] and t["overhead"] is not None])
    overhead = _median(t["overhead"] for t in real)
    if per_step is None or overhead is None:
        return None
    wall = overhead + num_steps * per_step
    cpu_ratio = _median(t["cpu"] / t["wall"] for t in own + base if t["wall"] and t["cpu"]) or 1.0
    return {"wall": wall, "cpu": wall * cpu_ratio, "step_seconds": per_step, "overhead": overhead,
            "source": source}


def pilot_summary(studies: Sequence[Study], budgets: Sequence[int], seeds: Sequence[int], runs_dir: str,
                  suite_pairs: Sequence[tuple[Study, Variant]], hours_limit: float, allow_dirty: bool
                  ) -> dict[str, Any]:
    """Per piloted study and budget: the baseline's main AP over the finished seeds (mean, std, the SE of a
    difference at that many seeds, the seeds a 2-point effect needs); per budget the suite's estimated hours with
    the largest of those seed counts, and the recommendation: the largest budget whose suite fits hours_limit."""
    timings = timing_records(runs_dir)
    noise = []
    for study in studies:
        spec = RunSpec.of(study.config, study.baseline.overrides)
        metric = PRIMARY_METRIC[study.task]
        for budget in budgets:
            runs = collect(runs_dir, [spec], seeds, budget, runs_dir, allow_dirty)
            values = [100.0 * r["metrics"][metric] for r in runs if r["included"]]
            minutes = [r["minutes"] for r in runs if r["included"] and r["minutes"]]
            entry = {"study": study.key, "run": spec.name, "metric": metric, "budget": budget, "n": len(values),
                     "values": values, "minutes": float(np.mean(minutes)) if minutes else None}
            if values:
                entry["mean"], entry["std"] = mean_std(values)
                entry["se_difference"] = (entry["std"] * math.sqrt(2.0 / len(values))
                                          if len(values) > 1 else float("nan"))
                entry["seeds_needed"] = seeds_needed(entry["std"]) if len(values) > 1 else None
            noise.append(entry)
    estimates = []
    specs = unique_runs(suite_pairs)
    for budget in budgets:
        needed = [e["seeds_needed"] for e in noise if e["budget"] == budget and e.get("seeds_needed")]
        n = max(needed) if needed else None
        costs = {spec.name: run_cost(spec, timings, budget) for spec in specs}
        unknown = [name for name, cost in costs.items() if cost is None]
        entry = {"budget": budget, "seeds": n, "runs": len(specs) * (n or 0), "unknown_cost": unknown,
                 "per_run": {name: cost for name, cost in costs.items()}}
        if n and not unknown:
            entry["wall_hours"] = n * sum(c["wall"] for c in costs.values()) / 3600.0
            entry["cpu_hours"] = n * sum(c["cpu"] for c in costs.values()) / 3600.0
            entry["fits"] = entry["wall_hours"] <= hours_limit
        estimates.append(entry)
    fitting = [e for e in estimates if e.get("fits")]
    recommended = max(fitting, key=lambda e: e["budget"]) if fitting else None
    return {"noise": noise, "estimates": estimates, "hours_limit": hours_limit,
            "recommended": None if recommended is None else {"budget": recommended["budget"],
                                                             "seeds": recommended["seeds"],
                                                             "wall_hours": recommended["wall_hours"]},
            "suite_runs": [s.name for s in specs], "cores": os.cpu_count()}


def format_pilot(pilot: Mapping[str, Any], command: str, code: Mapping[str, Any], suite_command: str | None) -> str:
    lines = [
        f"Each piloted study's baseline at each budget over seeds; a {EFFECT_POINTS:g}-point effect stands out at "
        f"{STANDARD_ERRORS:g} standard errors when {STANDARD_ERRORS:g} · std · sqrt(2/n) ≤ {EFFECT_POINTS:g}, i.e. "
        f"n ≥ 2 (std)² seeds per variant (at least {MIN_SEEDS}). The std of a few seeds is itself uncertain "
        "(with 4 seeds, by about ±40 %).", "",
        f"**Code:** {code['summary']}", "", "**Command:**", "", "```sh", command, "```", "",
        "| study | baseline run | budget (steps) | seeds | AP (mean ± std) | each seed | SE of a difference | "
        f"seeds for {EFFECT_POINTS:g} pts at {STANDARD_ERRORS:g} SE | wall min per run |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for e in pilot["noise"]:
        if not e["n"]:
            lines.append(f"| {e['study']} | {e['run']} | {e['budget']} | 0 | – | – | – | – | – |")
            continue
        std = "n/a" if math.isnan(e["std"]) else f"{e['std']:.2f}"
        se = "n/a" if math.isnan(e["se_difference"]) else f"{e['se_difference']:.2f}"
        lines.append(f"| {e['study']} | {e['run']} | {e['budget']} | {e['n']} | {e['mean']:.1f} ± {std} | "
                     f"{', '.join(f'{v:.1f}' for v in e['values'])} | {se} | {e.get('seeds_needed') or '–'} | "
                     f"{_number(e['minutes'])} |")
    lines += ["", f"The whole suite ({len(pilot['suite_runs'])} distinct runs per seed) at each budget with the "
              "largest seed count above; seconds per step from each run's own progress lines (`--smoke` or earlier "
              "runs) else from its config's baseline, fixed cost (compile, data, evaluation) from real runs of it "
              f"else of its config. Wall hours on this machine ({pilot['cores']} cores) as loaded when measured; CPU "
              "hours are user + system time of the runs.", "",
              "| budget | seeds | runs | wall hours | CPU hours | fits in "
              f"{pilot['hours_limit']:g} h |", "| ---: | ---: | ---: | ---: | ---: | --- |"]
    for e in pilot["estimates"]:
        if "wall_hours" in e:
            lines.append(f"| {e['budget']} | {e['seeds']} | {e['runs']} | {e['wall_hours']:.1f} | "
                         f"{e['cpu_hours']:.1f} | {'yes' if e['fits'] else 'no'} |")
        else:
            why = ("no seed count (fewer than 2 seeds finished)" if not e["seeds"] else
                   "no timing for " + ", ".join(e["unknown_cost"]) + " (run --smoke)")
            lines.append(f"| {e['budget']} | {e['seeds'] or '–'} | – | – | – | unknown: {why} |")
    recommended = pilot["recommended"]
    lines.append("")
    if recommended:
        lines += [f"**Recommended:** {recommended['budget']} steps with {recommended['seeds']} seeds "
                  f"(about {recommended['wall_hours']:.1f} wall hours here):", "", "```sh", suite_command, "```"]
    else:
        lines.append("**No piloted budget fits** the limit with the seeds it needs (or its cost is unknown): pilot "
                     "other budgets (`--pilot_budgets`), fewer studies, or raise `--pilot_hours`.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str], studies: Mapping[str, Study]) -> tuple[argparse.Namespace, dict[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Any --config.a.b=value flag is passed on to every run.")
    parser.add_argument("--studies", default=None, help=f"Comma-separated subset of {list(studies)} (default all).")
    parser.add_argument("--variants", default="",
                        help="Only these variants: study:variant or a variant name (names optional ones too).")
    parser.add_argument("--with_optional", action="store_true", help="Run the optional variants too.")
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds (train.seed and data.seed).")
    parser.add_argument("--num_steps", type=int, default=None,
                        help="Training steps per run (default: the config's); warmup and lr_steps scale with it.")
    parser.add_argument("--runs_dir", default="workdir/ablations", help="Where each run's workdir goes.")
    parser.add_argument("--out", default="experiments/RESULTS.md",
                        help="The report; results.json, ablations.png and pilot.json are written next to it.")
    parser.add_argument("--report_only", action="store_true",
                        help="Write the report from the finished runs without starting any.")
    parser.add_argument("--allow_dirty", action="store_true",
                        help="Run on a tree whose code has uncommitted changes, and count such runs (marked).")
    parser.add_argument("--smoke", action="store_true",
                        help="Every chosen variant, seed 0, --num_steps (default 15) steps on 16 generated images, "
                             "in RUNS_DIR/smoke; no report.")
    parser.add_argument("--pilot", action="store_true", help="The pilot: the chosen studies' baselines only.")
    parser.add_argument("--pilot_budgets", default="150,300", help="--pilot: comma-separated budgets (steps).")
    parser.add_argument("--pilot_seeds", default="0,1,2,3", help="--pilot: comma-separated seeds.")
    parser.add_argument("--pilot_hours", type=float, default=6.0,
                        help="--pilot: the wall hours the whole suite may take on this machine.")
    args, rest = parser.parse_known_args(argv)
    extra = {}
    for flag in rest:
        if not flag.startswith("--config.") or "=" not in flag:
            parser.error(f"unrecognized argument {flag!r} (config overrides are --config.a.b=value)")
        key, value = flag[len("--config."):].split("=", 1)
        extra[key] = value
    if "train.num_steps" in extra:
        # The budget is part of a run's folder (steps<N>) and scales the schedule: it has one flag.
        parser.error("give the budget as --num_steps, not --config.train.num_steps")
    args.studies_map = studies
    args.study_list = [s.strip() for s in (args.studies or ",".join(studies)).split(",") if s.strip()]
    unknown = [s for s in args.study_list if s not in studies]
    if unknown:
        parser.error(f"unknown studies {unknown}; choose from {list(studies)}")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = {f"{k}:{v.name}" for k in args.study_list for v in studies[k].variants} | {
        v.name for k in args.study_list for v in studies[k].variants}
    if [v for v in args.variant_list if v not in known]:
        parser.error(f"unknown variants {[v for v in args.variant_list if v not in known]}; choose from "
                     f"{sorted(k for k in known if ':' in k)}")
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.budget_list = [int(s) for s in args.pilot_budgets.split(",") if s.strip()]
    args.pilot_seed_list = [int(s) for s in args.pilot_seeds.split(",") if s.strip()]
    if not args.seed_list or not args.pilot_seed_list:
        parser.error("--seeds / --pilot_seeds name no seed")
    if args.smoke and args.pilot:
        parser.error("--smoke and --pilot are separate steps")
    return args, extra


def train_all(args, specs: Sequence[RunSpec], seeds: Sequence[int], num_steps: int | None, extra: Mapping[str, str],
              runs_dir: str, smoke: bool = False, after_run=None,
              recorded: Mapping[tuple[str, int], Any] = {}) -> None:
    """Trains every (spec, seed) not finished yet (in its workdir or in `recorded`), seed-major (when the time runs
    out, every run has the same number of seeds), calling after_run() after each."""
    env = run_environment(args.runs_dir)
    code = None
    for seed in seeds:
        for spec in specs:
            budget, own_extra = split_budget(spec.config, num_steps, extra)
            steps = int(budget["train.num_steps"])
            if smoke:
                own_extra = {**smoke_overrides(spec.config, args.runs_dir, steps), **own_extra}
            overrides = run_overrides(spec, seed, budget, own_extra)
            workdir = run_dir(runs_dir, spec, steps, seed)
            label = f"{spec.name} steps {steps} seed {seed}"
            if final_metrics(workdir, steps) is not None:
                print(f"skip {label}: finished ({workdir})", flush=True)
                continue
            if (spec.name, seed) in recorded:
                print(f"skip {label}: finished, recorded in {RESULTS_NAME} (its workdir is gone)", flush=True)
                continue
            if args.report_only:
                print(f"missing {label}: not finished ({workdir})", flush=True)
                continue
            if code is None:
                code = code_state()
                if not code["clean"] and not args.allow_dirty:
                    raise SystemExit(
                        "the code has uncommitted changes (" + ", ".join(code["changed"][:8]) + "): run the suite "
                        "from a fresh clone of a named commit, or pass --allow_dirty for a try (such runs are "
                        "marked, and left out of reports without --allow_dirty)")
            check_same_run(workdir, overrides, spec.config)
            print(f"run {label} -> {workdir}", flush=True)
            seconds = execute_run(spec.config, workdir, overrides, env, code, dict(spec.overrides), smoke=smoke)
            metrics = final_metrics(workdir, steps)
            if metrics is None:
                raise SystemExit(f"{workdir} ended without an evaluation at step {steps}")
            shown = ", ".join(f"{METRIC_LABELS[k]} {100 * metrics[k]:.1f}" for k in ("segm_AP", "bbox_AP",
                                                                                       "keypoints_AP") if k in metrics)
            print(f"done {label} in {seconds / 60:.1f} min: {shown}", flush=True)
            if after_run is not None:
                after_run()


def main(argv: Sequence[str], studies: Mapping[str, Study] | None = None) -> dict[str, Any]:
    studies = STUDIES if studies is None else studies
    args, extra = parse_args(argv, studies)
    pairs = select(studies, args.study_list, args.variant_list, args.with_optional)
    if not pairs:
        raise SystemExit("no variant chosen")

    if args.smoke:
        specs = unique_runs(pairs)
        train_all(args, specs, [0], args.num_steps or 15, extra, os.path.join(args.runs_dir, "smoke"), smoke=True)
        timings = timing_records(os.path.join(args.runs_dir, "smoke"))
        print("smoke: every chosen variant trained and evaluated; seconds per step:", flush=True)
        for spec in specs:
            per_step = _median(t["step_seconds"] for t in timings
                               if t["config"] == spec.config and t["variant"] == dict(spec.overrides))
            print(f"  {spec.name}: {'–' if per_step is None else f'{per_step:.2f} s'}", flush=True)
        return {"smoke": [s.name for s in specs]}

    if args.pilot:
        piloted = [studies[k] for k in args.study_list]
        baselines = unique_runs((s, s.baseline) for s in piloted)
        out_dir = os.path.dirname(os.path.abspath(args.out))

        def write_pilot():
            suite_pairs = select(studies, list(studies), (), False)
            pilot = pilot_summary(piloted, args.budget_list, args.pilot_seed_list, args.runs_dir, suite_pairs,
                                  args.pilot_hours, args.allow_dirty)
            runs = [r for budget in args.budget_list for r in collect(
                args.runs_dir, baselines, args.pilot_seed_list, budget, out_dir, args.allow_dirty)]
            code = code_summary(runs)
            command = shlex.join([".venv/bin/python", "experiments/ablations.py",
                                  *(a for a in argv if a != "--report_only")])
            suite_command = None
            if pilot["recommended"]:
                r = pilot["recommended"]
                suite_command = shlex.join([".venv/bin/python", "experiments/ablations.py",
                                            f"--num_steps={r['budget']}",
                                            "--seeds=" + ",".join(str(s) for s in range(r["seeds"])),
                                            *(a for a in argv if a.startswith("--config.") or
                                              a.startswith("--runs_dir"))])
            pilot.update({"command": command, "code": code, "suite_command": suite_command})
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, PILOT_NAME), "w") as f:
                json.dump(pilot, f, indent=2)
            write_markdown(args.out, pilot=format_pilot(pilot, command, code, suite_command))
            return pilot

        for budget in args.budget_list:
            train_all(args, baselines, args.pilot_seed_list, budget, extra, args.runs_dir, after_run=write_pilot)
        pilot = write_pilot()
        print(format_pilot(pilot, pilot["command"], pilot["code"], pilot["suite_command"]), flush=True)
        return pilot

    specs = unique_runs(pairs)
    budget, run_extra = split_budget(specs[0].config, args.num_steps, extra)
    num_steps = int(budget["train.num_steps"])

    # Read once, before the first report rewrites results.json.
    recorded = recorded_runs(os.path.dirname(os.path.abspath(args.out)), num_steps, run_extra)

    def report():
        return write_report(args.out, build_results(args, argv, pairs, specs, budget, run_extra, num_steps, recorded))

    train_all(args, specs, args.seed_list, num_steps, extra, args.runs_dir, after_run=report, recorded=recorded)
    results = report()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    print(f"wrote {args.out}, {os.path.join(out_dir, RESULTS_NAME)} and {os.path.join(out_dir, CHART_NAME)}",
          flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
