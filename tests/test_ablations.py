"""experiments/ablations.py on a tiny budget (two variants, one seed, 3 steps of the test config), its resume, and
experiments/ablations.ipynb executed headless against what it wrote."""

import importlib.util
import json
import os
import pathlib

import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"


def _load_runner():
    spec = importlib.util.spec_from_file_location("ablations", EXPERIMENTS / "ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablations = _load_runner()

TINY_VARIANTS = ("baseline", "class_agnostic_mask")


def test_the_budget_scales_warmup_and_lr_drop_with_the_steps():
    # configs/shapes.py: 1200 steps, warmup 100, drop at 1000.
    assert ablations.budget_overrides(str(ROOT / "configs" / "shapes.py"), 300) == {
        "train.num_steps": "300", "train.warmup_steps": "25", "train.lr_steps": "(250,)"}
    assert ablations.budget_overrides(str(ROOT / "configs" / "shapes.py"), None)["train.num_steps"] == "1200"


def test_every_variant_changes_exactly_one_setting_of_the_demo_config():
    config = ablations.load_config(str(ROOT / "configs" / "shapes.py"))
    assert ablations.VARIANTS["baseline"] == {}
    for name, overrides in ablations.VARIANTS.items():
        if name == "baseline":
            continue
        assert len(overrides) == 1, name
        (key, value), = overrides.items()
        section = config
        for part in key.split(".")[:-1]:
            section = section[part]
        assert str(section[key.split(".")[-1]]) != value, f"{name} does not change {key}"
        assert name in ablations.PAPER_TABLE2


def test_the_variant_override_wins_over_an_extra_override():
    overrides = ablations.run_overrides("mlp_head", 7, {"train.num_steps": "5"},
                                        {"model.roi_heads.mask_head": "fcn", "train.base_lr": "0.1"})
    assert overrides["model.roi_heads.mask_head"] == "mlp"
    assert overrides["train.base_lr"] == "0.1"
    assert overrides["train.seed"] == overrides["data.seed"] == "7"


def test_a_workdir_started_under_another_budget_is_refused(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / ablations.RUN_RECORD).write_text(json.dumps(
        {"config": "configs/shapes.py", "overrides": {"train.num_steps": "300"}, "seconds": []}))
    ablations.check_same_run(str(workdir), {"train.num_steps": "300"}, "configs/shapes.py")
    with pytest.raises(SystemExit, match="delete it or choose"):
        ablations.check_same_run(str(workdir), {"train.num_steps": "400"}, "configs/shapes.py")


def test_effects_compare_baseline_minus_variant_with_the_paper():
    runs = [{"variant": v, "seed": s, "metrics": {k: ap for k in ablations.METRICS}}
            for v, aps in (("baseline", (0.50, 0.54)), ("roi_pool", (0.40, 0.42))) for s, ap in enumerate(aps)]
    effects = ablations.effects(ablations.summarize(runs, ["baseline", "roi_pool"]))
    assert effects["roi_pool"]["delta"] == pytest.approx(11.0)
    # sqrt(s_b^2/2 + s_v^2/2) with s_b = 2.83 and s_v = 1.41 points
    assert effects["roi_pool"]["delta_se"] == pytest.approx(((8.0 + 2.0) / 2) ** 0.5)
    assert effects["roi_pool"]["paper_delta"] == pytest.approx(3.4)
    assert "delta" not in effects["softmax_mask"]


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_report_agrees_with_the_eval_metrics_it_read(tmp_path, capsys):
    """--report_only over fabricated runs (no training): results.json, the summary, the effects and the Markdown
    tables are the final-step lines of each run's eval_metrics.jsonl, their means and sample deviations, and the
    differences of those means; an unfinished run is reported missing and left out."""
    import numpy as np

    rng = np.random.default_rng(7)
    variants, seeds, num_steps = ("baseline", "roi_pool", "mlp_head"), (0, 1, 2), 5
    runs_dir, out = tmp_path / "runs", tmp_path / "report" / "RESULTS.md"
    final = {}
    for variant in variants:
        for seed in seeds:
            metrics = {k: round(float(v), 4) for k, v in zip(ablations.METRICS, rng.uniform(0.05, 0.6, 4))}
            earlier = {k: round(float(v), 4) for k, v in zip(ablations.METRICS, rng.uniform(0.0, 0.05, 4))}
            finished = (variant, seed) != ("mlp_head", 2)
            records = [{"step": 3, **earlier}] + ([{"step": num_steps, **metrics}] if finished else [])
            _write_jsonl(runs_dir / variant / f"seed{seed}" / "eval_metrics.jsonl", records)
            (runs_dir / variant / f"seed{seed}" / ablations.RUN_RECORD).write_text(
                json.dumps({"config": "configs/test.py", "overrides": {}, "seconds": [60.0 * (seed + 1)]}))
            if finished:
                final[variant, seed] = metrics
    argv = ["--config=configs/test.py", f"--num_steps={num_steps}", "--seeds=0,1,2",
            f"--variants={','.join(variants)}", f"--runs_dir={runs_dir}", f"--out={out}", "--report_only"]
    results = ablations.main(argv)
    printed = capsys.readouterr().out
    assert "missing mlp_head seed 2" in printed and "skip baseline seed 0: finished" in printed
    assert "run " not in printed  # --report_only starts nothing

    assert json.loads((out.parent / "results.json").read_text()) == json.loads(json.dumps(results))
    for run in results["runs"]:
        assert run["metrics"] == final.get((run["variant"], run["seed"]))
        assert run["minutes"] == run["seed"] + 1
    report = out.read_text()
    means = {}
    for variant in variants:
        finished = [s for s in seeds if (variant, s) in final]
        entry = results["summary"][variant]
        assert entry["n"] == len(finished) and entry["seeds"] == finished
        cells = []
        for key in ablations.METRICS:
            values = 100.0 * np.array([final[variant, s][key] for s in finished])
            assert entry[key]["mean"] == pytest.approx(values.mean(), abs=1e-9)
            assert entry[key]["std"] == pytest.approx(values.std(ddof=1), abs=1e-9)
            cells.append(f"{values.mean():.1f} ± {values.std(ddof=1):.1f}")
        means[variant] = 100.0 * np.array([final[variant, s]["segm_AP"] for s in finished])
        assert f"| {variant} | " in report and " | ".join(cells) in report
    for variant in ("roi_pool", "mlp_head"):
        effect = results["effects"][variant]
        base, other = means["baseline"], means[variant]
        assert effect["delta"] == pytest.approx(base.mean() - other.mean(), abs=1e-9)
        se = np.sqrt(base.var(ddof=1) / len(base) + other.var(ddof=1) / len(other))
        assert effect["delta_se"] == pytest.approx(se, abs=1e-9)
        assert f"| {variant} | " in report and f"{effect['delta']:+.1f} ± {se:.1f} |" in report
    assert "mlp_head seed 2" in report.split("Missing runs")[1].splitlines()[0]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """Runs the runner once on the tiny budget; returns (argv, output folder, runs folder, its stdout)."""
    base = tmp_path_factory.mktemp("ablations")
    argv = ["--config=configs/test.py", "--num_steps=3", "--seeds=0", f"--variants={','.join(TINY_VARIANTS)}",
            f"--runs_dir={base / 'runs'}", f"--out={base / 'report' / 'RESULTS.md'}",
            f"--config.data.data_dir={base / 'tfds'}", f"--config.data.shapes.dir={base / 'shapes'}",
            "--config.train.checkpoint_every=3", "--config.eval.num_overlays=2"]
    with pytest.MonkeyPatch.context() as patch:
        # The suite's persistent compilation cache (tests/conftest.py) serves the runs' subprocesses too.
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".venv" / "jax_cache"))
        results = ablations.main(argv)
    return argv, base / "report", base / "runs", results


def test_the_runner_trains_every_variant_and_writes_the_report(tiny_study):
    _, report_dir, runs_dir, results = tiny_study
    saved = json.loads((report_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [(r["variant"], r["seed"]) for r in saved["runs"]] == [(v, 0) for v in TINY_VARIANTS]
    for run in saved["runs"]:
        lines = (runs_dir / run["variant"] / "seed0" / "eval_metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1])
        assert last["step"] == 3
        # The results are the run's own final evaluation, and the summary of one seed is that evaluation.
        assert run["metrics"] == {k: v for k, v in last.items() if k != "step"}
        for key in ablations.METRICS:
            assert saved["summary"][run["variant"]][key]["mean"] == pytest.approx(100.0 * last[key])
        assert len(list((report_dir / run["overlays"]).glob("*.png"))) == 2
        config = json.loads((runs_dir / run["variant"] / "seed0" / "config.json").read_text())
        assert config["train"]["seed"] == config["data"]["seed"] == 0
        assert config["train"]["num_steps"] == 3
        assert config["model"]["roi_heads"]["class_agnostic_mask"] is (run["variant"] == "class_agnostic_mask")
    assert saved["summary"]["baseline"]["n"] == 1
    report = (report_dir / "RESULTS.md").read_text()
    for variant in TINY_VARIANTS:
        assert f"| {variant} |" in report
    assert "3 steps of 2 images" in report
    assert "experiments/ablations.py --config=configs/test.py --num_steps=3" in report
    assert ablations.ANALYSIS_PLACEHOLDER in report
    with Image.open(report_dir / "ablations.png") as chart:
        assert chart.width > 300 and chart.height > 200


def test_a_second_invocation_skips_finished_runs_and_keeps_the_analysis(tiny_study, capsys):
    argv, report_dir, runs_dir, _ = tiny_study
    report_path = report_dir / "RESULTS.md"
    report_path.write_text(report_path.read_text().replace(ablations.ANALYSIS_PLACEHOLDER, "Written by hand."))
    metrics_files = [runs_dir / v / "seed0" / "eval_metrics.jsonl" for v in TINY_VARIANTS]
    before = [os.stat(p).st_mtime_ns for p in metrics_files]
    capsys.readouterr()
    ablations.main(argv)
    out = capsys.readouterr().out
    for variant in TINY_VARIANTS:
        assert f"skip {variant} seed 0: finished" in out
    assert "run " not in out
    assert [os.stat(p).st_mtime_ns for p in metrics_files] == before
    report = report_path.read_text()
    assert "Written by hand." in report and ablations.ANALYSIS_PLACEHOLDER not in report


def test_the_notebook_executes_headless_on_the_tiny_results(tiny_study, monkeypatch):
    import nbformat
    from nbconvert.preprocessors import ExecutePreprocessor

    _, report_dir, _, _ = tiny_study
    monkeypatch.setenv("ABLATIONS_RESULTS", str(report_dir / "results.json"))
    notebook = nbformat.read(EXPERIMENTS / "ablations.ipynb", as_version=4)
    ExecutePreprocessor(timeout=300, kernel_name="python3").preprocess(
        notebook, {"metadata": {"path": str(EXPERIMENTS)}})
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # the bar chart, the effects beside the paper, the side-by-side predictions
    text = "".join(o.get("text", "") for o in outputs)
    assert "2 runs, 3 steps of 2 images" in text
