"""experiments/ablations.py: its studies against their config files, its statistics and report blocks on
fabricated runs, its refusals, and one tiny run (RoIAlign and RoIPool, one seed, 3 steps of configs/test.py) with
its resume and experiments/ablations.ipynb executed headless against what it wrote."""

import importlib.util
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from maskrcnn_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"


def _load_runner():
    spec = importlib.util.spec_from_file_location("ablations", EXPERIMENTS / "ablations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablations"] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


ablations = _load_runner()


def parse(config_path, overrides):
    """The config a run gets: the file with --config.a.b=value flags, parsed as maskrcnn_jax.main parses them."""
    argv = ["prog", f"--config={ROOT / config_path}", *(f"--config.{k}={v}" for k, v in overrides.items())]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def what_runs(config):
    """The flattened config as the model reads it: an unset roi_reduce is avg (defaults.py)."""
    values = flat(config.to_dict())
    if values["model.roi_heads.roi_reduce"] is None:
        values["model.roi_heads.roi_reduce"] = "avg"
    return values


STUDY_VARIANTS = [(key, v.name) for key, study in ablations.STUDIES.items() for v in study.variants]


@pytest.mark.parametrize("key,name", STUDY_VARIANTS, ids=[f"{k}:{n}" for k, n in STUDY_VARIANTS])
def test_every_variant_changes_exactly_the_settings_it_names(key, name):
    study = ablations.STUDIES[key]
    variant = study.variant(name)
    config_path = study.config_of(variant)
    base = flat(config_lib.load(ROOT / config_path).to_dict())
    budget = ablations.budget_overrides(config_path, 300)
    config = parse(config_path, ablations.run_overrides(ablations.RunSpec.of(config_path, variant.overrides), 1,
                                                        budget, {}))
    config_lib.validate(config)
    changed = {k for k, v in flat(config.to_dict()).items() if v != base[k]}
    assert changed == set(variant.overrides) | {"train.num_steps", "train.warmup_steps", "train.lr_steps",
                                                "train.seed", "data.seed"}
    assert config.train.num_steps == 300 and config.train.seed == config.data.seed == 1
    if variant is study.baseline:
        assert not variant.overrides  # the pilot's noise is the config's own


def test_the_ablation_configs_are_their_demo_configs_on_a_320_pixel_canvas():
    for ablation, demo in (("ablations_fpn", "shapes"), ("ablations_c4", "shapes_c4"), ("ablations_c5", "shapes_c5"),
                           ("ablations_keypoints", "stick_figures")):
        config = flat(config_lib.load(ROOT / "configs" / f"{ablation}.py").to_dict())
        other = flat(config_lib.load(ROOT / "configs" / f"{demo}.py").to_dict())
        assert {k for k in config if config[k] != other[k]} == {"data.canvas_size"}, ablation
        assert tuple(config["data.canvas_size"]) == (320, 320)
        assert (config["model.backbone.depth"], config["model.backbone.norm"], config["model.backbone.freeze_at"]) == (
            18, "gn", 0)  # ResNet-18-GN from scratch
    assert config_lib.load(ROOT / ablations.C4).model.anchors.strides == (16,)
    assert config_lib.load(ROOT / ablations.C5).model.anchors.strides == (32,)


def test_every_effect_compares_two_variants_of_its_study_that_differ():
    for study in ablations.STUDIES.values():
        names = [v.name for v in study.variants]
        assert len(set(names)) == len(names)
        assert study.pair is None or set(study.pair) <= set(names)
        for effect in study.effects:
            choice, alternative = study.variant(effect.choice), study.variant(effect.alternative)
            a = what_runs(parse(study.config_of(choice), choice.overrides))
            b = what_runs(parse(study.config_of(alternative), alternative.overrides))
            assert {k for k in a if a[k] != b[k]}, f"{study.key}: {effect.label} compares two equal models"
    c4 = ablations.STUDIES["2c"]
    assert what_runs(parse(ablations.C4, c4.variant("warp_avg").overrides))["model.roi_heads.roi_reduce"] == "avg"
    # The paper's effects, from its rows: Table 2c, 2d (mask and box), Table 6.
    paper = {(s, e.label): ablations.paper_effect(ablations.STUDIES[s], e) for s in ablations.STUDIES
             for e in ablations.STUDIES[s].effects}
    assert paper["2c", "RoIAlign vs RoIPool"]["segm_AP"] == pytest.approx(3.4)
    assert paper["2d", "RoIAlign vs RoIPool"]["segm_AP"] == pytest.approx(7.3)
    assert paper["2d", "RoIAlign vs RoIPool"]["segm_AP75"] == pytest.approx(10.5)
    assert paper["2d", "RoIAlign vs RoIPool"]["bbox_AP"] == pytest.approx(5.8)
    assert paper["t6", "RoIAlign vs RoIPool"]["keypoints_AP"] == pytest.approx(4.4)
    assert paper["2d", "half-pixel offset: aligned=True vs False"]["segm_AP"] is None


def test_studies_share_the_runs_of_one_model():
    suite = ablations.unique_runs(ablations.select(ablations.STUDIES, list(ablations.STUDIES)))
    names = [spec.name for spec in suite]
    assert len(names) == len(set(names)) == 14
    assert names.count("ablations_c4/base") == 1 and names.count("ablations_fpn/base") == 1  # 2a = 2c, 2a = 2b = 2e
    optional = ablations.select(ablations.STUDIES, ["2a", "2d"], with_optional=True)
    assert {v.name for _, v in optional} == {"fpn_r18", "fpn_r34", "c4_r18", "c4_r34", "fpn_r50", "fpn_x50", "align",
                                             "pool", "align_unaligned"}
    assert [(s.key, v.name) for s, v in ablations.select(ablations.STUDIES, ["2c", "2d"], ["2d:pool", "align_max"])] == [
        ("2c", "align_max"), ("2d", "pool")]


def test_the_budget_scales_the_schedule_and_an_explicit_setting_wins():
    # configs/ablations_fpn.py: shapes.py's 1200 steps, warmup 100, drop at 1000.
    assert ablations.budget_overrides(ablations.FPN, 300) == {
        "train.num_steps": "300", "train.warmup_steps": "25", "train.lr_steps": "(250,)"}
    assert ablations.budget_overrides(ablations.FPN, None)["train.num_steps"] == "1200"
    budget, extra = ablations.split_budget(ablations.FPN, 300, {"train.warmup_steps": "7", "train.base_lr": "0.1"})
    assert budget == {"train.num_steps": "300", "train.warmup_steps": "7", "train.lr_steps": "(250,)"}
    assert extra == {"train.base_lr": "0.1"}
    with pytest.raises(SystemExit):
        ablations.parse_args(["--config.train.num_steps=5"], ablations.STUDIES)


def test_the_variant_wins_over_an_extra_override_and_the_seed_sets_both_seeds():
    spec = ablations.RunSpec.of(ablations.FPN, {"model.roi_heads.mask_head": "mlp"})
    overrides = ablations.run_overrides(spec, 7, {"train.num_steps": "5"},
                                        {"model.roi_heads.mask_head": "fcn", "train.base_lr": "0.1", "train.seed": "3"})
    assert overrides["model.roi_heads.mask_head"] == "mlp"
    assert overrides["train.base_lr"] == "0.1" and overrides["train.num_steps"] == "5"
    assert overrides["train.seed"] == overrides["data.seed"] == "7"


def test_a_workdir_started_with_other_overrides_is_refused(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / ablations.RUN_RECORD).write_text(json.dumps(
        {"config": ablations.C4, "overrides": {"train.num_steps": "300"}, "seconds": []}))
    ablations.check_same_run(str(workdir), {"train.num_steps": "300"}, ablations.C4)
    with pytest.raises(SystemExit, match="delete it or choose"):
        ablations.check_same_run(str(workdir), {"train.num_steps": "400"}, ablations.C4)
    with pytest.raises(SystemExit, match="delete it or choose"):
        ablations.check_same_run(str(workdir), {"train.num_steps": "300"}, ablations.C5)


def test_code_state_sees_uncommitted_code_but_not_results(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for path in ("maskrcnn_jax/model.py", "configs/a.py", "experiments/ablations.py", "experiments/RESULTS.md",
                 "pyproject.toml"):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text("x\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    monkeypatch.setattr(ablations, "ROOT", str(tmp_path))
    state = ablations.code_state()
    assert state["clean"] and len(state["commit"]) == 40
    (tmp_path / "experiments" / "RESULTS.md").write_text("a result\n")
    assert ablations.code_state() == state
    (tmp_path / "configs" / "new.py").write_text("untracked\n")
    assert ablations.code_state()["changed"] == ["configs/new.py"]
    (tmp_path / "configs" / "new.py").unlink()
    (tmp_path / "maskrcnn_jax" / "model.py").write_text("edited\n")
    assert not ablations.code_state()["clean"]
    git("commit", "-qam", "d")
    after = ablations.code_state()
    assert after["clean"] and after["code_tree"] != state["code_tree"]


def test_a_dirty_tree_is_refused_without_allow_dirty(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ablations, "code_state", lambda: {"commit": "c" * 40, "code_tree": "t", "clean": False,
                                                          "changed": ["maskrcnn_jax/x.py"]})
    started = []

    def execute_run(*args, **kwargs):
        started.append(args[1])
        raise SystemExit("stop here")

    monkeypatch.setattr(ablations, "execute_run", execute_run)
    argv = ["--studies=2e", "--variants=mlp", "--num_steps=10", f"--runs_dir={tmp_path}",
            f"--out={tmp_path / 'RESULTS.md'}"]
    with pytest.raises(SystemExit, match="uncommitted changes .maskrcnn_jax/x.py"):
        ablations.main(argv)
    assert not started
    with pytest.raises(SystemExit, match="stop here"):
        ablations.main(argv + ["--allow_dirty"])
    assert started == [str(tmp_path / "ablations_fpn" / "mask_head=mlp" / "steps10" / "seed0")]


def _run(seed, segm_ap):
    return {"seed": seed, "included": True, "metrics": {"segm_AP": segm_ap}}


def test_the_statistics():
    assert ablations.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert math.isnan(ablations.mean_std([4.0])[1])
    # Different seeds: the SE of a difference of two means.
    a = ablations.summarize_runs([_run(s, v) for s, v in ((0, 0.08), (1, 0.10), (2, 0.12))])
    b = ablations.summarize_runs([_run(s, v) for s, v in ((0, 0.065), (3, 0.075))])
    assert a["segm_AP"]["values"] == pytest.approx([8.0, 10.0, 12.0]) and a["seeds"] == [0, 1, 2]
    found = ablations.difference(a, b, "segm_AP")
    assert found["delta"] == pytest.approx(3.0) and not found["paired"]
    assert found["se"] == found["se_unpaired"] == pytest.approx(math.sqrt(4.0 / 3 + 0.5 / 2))
    # The same seeds: the SE of the mean of the per-seed differences (here the runs move together).
    c = ablations.summarize_runs([_run(s, v) for s, v in ((0, 0.07), (1, 0.085), (2, 0.10))])
    found = ablations.difference(a, c, "segm_AP")
    assert found["paired"] and found["delta"] == pytest.approx(1.5)
    differences = np.array([1.0, 1.5, 2.0])
    assert found["se"] == pytest.approx(differences.std(ddof=1) / math.sqrt(3))
    assert found["se_unpaired"] == pytest.approx(math.sqrt(4.0 / 3 + 2.25 / 3)) and found["se"] < found["se_unpaired"]
    single = ablations.summarize_runs([_run(0, 0.1)])
    assert math.isnan(ablations.difference(single, b, "segm_AP")["se"])
    assert math.isnan(ablations.difference(single, ablations.summarize_runs([_run(0, 0.2)]), "segm_AP")["se"])
    assert ablations.difference({"n": 0}, b, "segm_AP") is None
    # n >= 2 (2 std / 2)^2 seeds, at least 3.
    assert [ablations.seeds_needed(s) for s in (0.5, 1.0, 1.5, 2.0, float("nan"))] == [3, 3, 5, 8, 3]
    assert ablations.verdict(3.0, 1.0, 3.4) == "resolved, same sign as the paper"
    assert ablations.verdict(-3.0, 1.0, 3.4) == "resolved, OPPOSITE sign to the paper"
    assert ablations.verdict(1.5, 1.0, 3.4) == "not resolved (within 2 SE)"
    assert ablations.verdict(3.0, 1.0, 0.1) == "resolved, but the paper finds none"
    assert ablations.verdict(3.0, float("nan"), 3.4) == "no SE (one seed)"


def test_the_report_blocks_are_kept_when_another_is_rewritten(tmp_path):
    path = str(tmp_path / "RESULTS.md")
    ablations.write_markdown(path, suite="suite one")
    text = open(path).read()
    assert "suite one" in text and ablations.PILOT_PLACEHOLDER in text and ablations.ANALYSIS_PLACEHOLDER in text
    with open(path, "w") as f:
        f.write(text.replace(ablations.ANALYSIS_PLACEHOLDER, "Written by hand."))
    ablations.write_markdown(path, pilot="pilot one")
    ablations.write_markdown(path, suite="suite two")
    text = open(path).read()
    assert "suite two" in text and "suite one" not in text
    assert "pilot one" in text and "Written by hand." in text
    assert text.count(ablations.SUITE_BEGIN) == text.count(ablations.PILOT_BEGIN) == 1


TINY = ablations.Study(
    key="tiny", title="Tiny: RoIAlign vs RoIPool", config="configs/test.py", task="segm", setting="the paper's",
    note="ours", effect_metrics=ablations.MASK_METRICS + ablations.BOX_METRICS, pair=("align", "pool"),
    variants=(ablations.Variant("align", "RoIAlign", paper_row="RoIAlign", paper={"segm_AP": 30.9}),
              ablations.Variant("pool", "RoIPool", {"model.roi_heads.roi_op": "pool"}, paper_row="RoIPool",
                                paper={"segm_AP": 23.6})),
    effects=(ablations.Effect("RoIAlign vs RoIPool", "align", "pool"),))


def _fabricate(workdir, metrics_by_step, clean=True, minutes=1.0):
    workdir.mkdir(parents=True)
    (workdir / "eval_metrics.jsonl").write_text("".join(json.dumps({"step": s, **m}) + "\n"
                                                        for s, m in metrics_by_step))
    (workdir / ablations.RUN_RECORD).write_text(json.dumps({
        "config": TINY.config, "overrides": {}, "variant_overrides": {}, "seconds": [60.0 * minutes],
        "attempts": [{"commit": "a" * 40, "code_tree": "tree", "clean": clean, "seconds": 60.0 * minutes,
                      "cpu_seconds": 100.0 * minutes, "exit": 0}]}))


def test_the_report_is_the_final_evaluations_of_the_clean_runs(tmp_path, capsys):
    """--report_only over fabricated runs: each run's metrics are its final-step line; a run on an edited tree and
    an unfinished one are left out and named; the summary and the effect are their means, stds and difference."""
    rng = np.random.default_rng(0)
    runs_dir, out, steps = tmp_path / "runs", tmp_path / "report" / "RESULTS.md", 5
    final = {}
    for variant in TINY.variants:
        spec = ablations.RunSpec.of(TINY.config, variant.overrides)
        for seed in range(4):
            metrics = {k: round(float(v), 4) for k, v in zip(ablations.MASK_METRICS + ablations.BOX_METRICS,
                                                            rng.uniform(0.1, 0.6, 6))}
            finished = (variant.name, seed) != ("pool", 3)
            clean = (variant.name, seed) != ("align", 3)
            _fabricate(pathlib.Path(ablations.run_dir(str(runs_dir), spec, steps, seed)),
                       [(2, {"segm_AP": 0.01})] + ([(steps, metrics)] if finished else []), clean, seed + 1)
            if finished and clean:
                final[variant.name, seed] = metrics
    argv = [f"--num_steps={steps}", "--seeds=0,1,2,3", f"--runs_dir={runs_dir}", f"--out={out}", "--report_only"]
    results = ablations.main(argv, studies={"tiny": TINY})
    printed = capsys.readouterr().out
    assert "missing test/roi_op=pool steps 5 seed 3" in printed and "skip test/base steps 5 seed 0" in printed
    assert json.loads((out.parent / "results.json").read_text()) == json.loads(json.dumps(results))
    study, = results["studies"]
    summaries = {v["name"]: v["summary"] for v in study["variants"]}
    values = {}
    for name in ("align", "pool"):
        seeds = [s for s in range(4) if (name, s) in final]
        assert summaries[name]["seeds"] == seeds == [0, 1, 2]
        for metric in ablations.MASK_METRICS + ablations.BOX_METRICS:
            points = [100.0 * final[name, s][metric] for s in seeds]
            assert summaries[name][metric]["mean"] == pytest.approx(np.mean(points))
            assert summaries[name][metric]["std"] == pytest.approx(np.std(points, ddof=1))
        values[name] = np.array([100.0 * final[name, s]["segm_AP"] for s in seeds])
    measured = study["effects"][0]["measured"]["segm_AP"]
    assert measured["delta"] == pytest.approx(values["align"].mean() - values["pool"].mean())
    assert measured["paired"]  # both ran seeds 0, 1, 2
    assert measured["se"] == pytest.approx((values["align"] - values["pool"]).std(ddof=1) / np.sqrt(3))
    assert measured["se_unpaired"] == pytest.approx(
        np.sqrt((values["align"].var(ddof=1) + values["pool"].var(ddof=1)) / 3))
    assert study["effects"][0]["paper"]["segm_AP"] == pytest.approx(7.3)
    report = out.read_text()
    assert "**Left out (edited tree or unknown commit):** test/base seed 3." in report
    assert "**Not finished (not in the tables):** test/roi_op=pool seed 3." in report
    assert f"{measured['delta']:+.1f} ± {measured['se']:.1f}" in report
    assert "commit aaaaaaaaaa" in report
    # With --allow_dirty the edited run counts, marked.
    results = ablations.main(argv + ["--allow_dirty"], studies={"tiny": TINY})
    assert results["studies"][0]["variants"][0]["summary"]["seeds"] == [0, 1, 2, 3]
    assert "align † (RoIAlign)" in out.read_text()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The runner on the tiny study: 3 steps of configs/test.py, seed 0; returns (argv, report dir, runs dir,
    results, stdout). --allow_dirty: the tests run in edited trees too."""
    base = tmp_path_factory.mktemp("ablations")
    argv = ["--num_steps=3", "--seeds=0", "--allow_dirty", f"--runs_dir={base / 'runs'}",
            f"--out={base / 'report' / 'RESULTS.md'}", f"--config.data.data_dir={base / 'tfds'}",
            f"--config.data.shapes.dir={base / 'shapes'}", "--config.train.checkpoint_every=3",
            "--config.eval.num_overlays=1"]
    with pytest.MonkeyPatch.context() as patch:
        # The suite's persistent compilation cache (tests/conftest.py) serves the runs' subprocesses too.
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".venv" / "jax_cache"))
        results = ablations.main(argv, studies={"tiny": TINY})
    return argv, base / "report", base / "runs", results


def test_the_runner_trains_every_variant_and_reports_its_own_evaluations(tiny_run):
    _, report_dir, runs_dir, results = tiny_run
    saved = json.loads((report_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [(r["run"], r["seed"]) for r in saved["runs"]] == [("test/base", 0), ("test/roi_op=pool", 0)]
    for run in saved["runs"]:
        workdir = report_dir / run["workdir"]
        last = json.loads((workdir / "eval_metrics.jsonl").read_text().splitlines()[-1])
        assert last["step"] == 3 and run["metrics"] == {k: v for k, v in last.items() if k != "step"}
        config = json.loads((workdir / "config.json").read_text())
        assert config["train"]["seed"] == config["data"]["seed"] == 0 and config["train"]["num_steps"] == 3
        assert config["model"]["roi_heads"]["roi_op"] == ("pool" if "pool" in run["run"] else "align")
        record = json.loads((workdir / ablations.RUN_RECORD).read_text())
        attempt, = record["attempts"]
        assert attempt["exit"] == 0 and attempt["cpu_seconds"] > 0 and attempt["commit"] == run["commit"]
        assert run["included"] and len(list((report_dir / run["overlays"]).glob("*.png"))) == 1
    align, pool = saved["studies"][0]["variants"]
    assert align["summary"]["segm_AP"]["mean"] == pytest.approx(100.0 * saved["runs"][0]["metrics"]["segm_AP"])
    report = (report_dir / "RESULTS.md").read_text()
    assert "**3 steps** of 2 images" in report
    assert "experiments/ablations.py --num_steps=3 --seeds=0 --allow_dirty" in report
    with Image.open(report_dir / ablations.CHART_NAME) as chart:
        assert chart.width > 300 and chart.height > 200


def _execute_notebook(results_path, monkeypatch) -> list:
    """experiments/ablations.ipynb executed headless on results_path; its code cells' outputs."""
    import nbformat
    from nbconvert.preprocessors import ExecutePreprocessor

    monkeypatch.setenv("ABLATIONS_RESULTS", str(results_path))
    notebook = nbformat.read(EXPERIMENTS / "ablations.ipynb", as_version=4)
    ExecutePreprocessor(timeout=300, kernel_name="python3").preprocess(
        notebook, {"metadata": {"path": str(EXPERIMENTS)}})
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]


def test_the_notebook_executes_headless_on_the_tiny_results(tiny_run, monkeypatch):
    _, report_dir, _, _ = tiny_run
    outputs = _execute_notebook(report_dir / "results.json", monkeypatch)
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # every study beside the paper, the effects, RoIAlign and RoIPool side by side
    text = "".join(o.get("text", "") for o in outputs)
    assert "2 of 2 runs counted, 3 steps of 2 images" in text
    assert "tiny RoIAlign vs RoIPool" in text and "mask AP" in text


def test_a_second_invocation_trains_nothing_and_keeps_the_hand_written_blocks(tiny_run, capsys):
    argv, report_dir, runs_dir, _ = tiny_run
    report_path = report_dir / "RESULTS.md"
    report_path.write_text(report_path.read_text().replace(ablations.ANALYSIS_PLACEHOLDER, "Written by hand."))
    metrics_files = sorted(runs_dir.glob("test/*/steps3/seed0/eval_metrics.jsonl"))
    assert len(metrics_files) == 2
    before = [os.stat(p).st_mtime_ns for p in metrics_files]
    capsys.readouterr()
    ablations.main(argv, studies={"tiny": TINY})
    printed = capsys.readouterr().out
    assert printed.count("skip test/") == 2 and "run test/" not in printed
    assert [os.stat(p).st_mtime_ns for p in metrics_files] == before
    report = report_path.read_text()
    assert "Written by hand." in report and ablations.ANALYSIS_PLACEHOLDER not in report


def test_a_finished_run_whose_workdir_is_gone_is_carried_from_results_json(tmp_path, monkeypatch, capsys):
    """A new checkout has the committed results.json but not the runs' workdirs: the finished runs it records (at the
    same budget and extra overrides) are not trained again, and the report keeps their metrics and provenance."""
    runs_dir, out, steps = tmp_path / "runs", tmp_path / "report" / "RESULTS.md", 5
    rng = np.random.default_rng(1)
    for variant in TINY.variants:
        spec = ablations.RunSpec.of(TINY.config, variant.overrides)
        for seed in range(2):
            metrics = {k: round(float(v), 4) for k, v in zip(ablations.MASK_METRICS, rng.uniform(0.1, 0.6, 3))}
            _fabricate(pathlib.Path(ablations.run_dir(str(runs_dir), spec, steps, seed)), [(steps, metrics)])
    argv = [f"--num_steps={steps}", "--seeds=0,1", f"--runs_dir={runs_dir}", f"--out={out}"]
    first = ablations.main(argv + ["--report_only"], studies={"tiny": TINY})
    assert not any(r["recorded"] for r in first["runs"])
    gone = ablations.run_dir(str(runs_dir), ablations.RunSpec.of(TINY.config, {}), steps, 1)
    shutil.rmtree(gone)

    started = []
    monkeypatch.setattr(ablations, "execute_run", lambda *args, **kwargs: started.append(args[1]))
    capsys.readouterr()
    second = ablations.main(argv, studies={"tiny": TINY})
    assert not started
    assert "skip test/base steps 5 seed 1: finished, recorded in results.json" in capsys.readouterr().out
    carried = [r for r in second["runs"] if r["recorded"]]
    assert [(r["run"], r["seed"]) for r in carried] == [("test/base", 1)]
    before = {(r["run"], r["seed"]): r for r in first["runs"]}
    assert carried[0]["metrics"] == before["test/base", 1]["metrics"] and carried[0]["included"]
    assert carried[0]["commit"] == "a" * 40 and carried[0]["minutes"] == before["test/base", 1]["minutes"]
    assert second["studies"] == first["studies"]
    assert "**1 run(s) are carried from the committed results.json**" in out.read_text()
    # The record also survives a second rewrite of results.json.
    assert [r["recorded"] for r in ablations.main(argv + ["--report_only"], studies={"tiny": TINY})["runs"]] == [
        False, True, False, False]

    # Another budget or other extra overrides are other runs: nothing is carried, the lost run trains again.
    with pytest.raises(SystemExit, match="ended without an evaluation"):  # execute_run is stubbed out above
        ablations.main([f"--num_steps={steps}", "--seeds=1", f"--runs_dir={runs_dir}", f"--out={out}",
                        "--allow_dirty", "--config.train.base_lr=0.1"], studies={"tiny": TINY})
    assert started == [gone]


def test_the_notebook_says_so_when_no_pair_has_its_detections_on_disk(tiny_run, tmp_path, monkeypatch):
    """Runs carried from a committed results.json have no workdir: the charts still draw, the side-by-side says why
    it cannot."""
    _, report_dir, _, _ = tiny_run
    results = json.loads((report_dir / "results.json").read_text())
    for run in results["runs"]:
        run["workdir"] = str(tmp_path / "gone" / run["run"])
    (tmp_path / "results.json").write_text(json.dumps(results))
    outputs = _execute_notebook(tmp_path / "results.json", monkeypatch)
    assert not [o for o in outputs if o.output_type == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 2
    assert "No RoIAlign / RoIPool pair of one seed has its detections on disk" in "".join(
        o.get("text", "") for o in outputs)
