"""benchmarks/accelerator.py's dry run: every row of the GPU benchmark at tiny sizes on the CPU, with TensorFlow
unimportable (the accelerator machine has none), and the section it prints holds every row, measured."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "accelerator.py"
# The suite's persistent compilation cache (conftest.py): a rerun of the dry run compiles nothing.
CACHE_DIR = ROOT / ".venv" / "jax_cache"


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("accelerator_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_tensorflow_env(tmp_path):
    """An environment in which `import tensorflow` (and tensorflow_datasets) raises, in every subprocess."""
    for name in ("tensorflow", "tensorflow_datasets"):
        package = tmp_path / "blocked" / name
        package.mkdir(parents=True)
        message = f"{name} is blocked: the benchmark must not need it"
        (package / "__init__.py").write_text(f"raise ImportError({message!r})\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "blocked"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    probe = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "is blocked" in probe.stderr
    return env


def test_dry_run_prints_every_row_without_tensorflow(no_tensorflow_env):
    benchmark = _benchmark_module()
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", f"--cache-dir={CACHE_DIR}"], cwd=ROOT,
                         env=no_tensorflow_env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert text.startswith("## accelerator (`benchmarks/accelerator.py`)"), text[:500]
    assert "no TensorFlow imported: no." in text
    number = r"\d+(?:\.\d+)?"
    expected = {
        "train": rf"\| {{name}} \| {{dtype}} \| {{batch}} \| {number} \| {number} \| {number}(?: \(cached\))? \|",
        "torchvision": rf"\| torchvision \| AMP \([^)]*\) \| {{batch}} \| {number} \| {number} \| eager \|",
        "predict": rf"\| predict \| {{dtype}} \| {{batch}} \| {number} \| {number} \| {number}(?: \(cached\))? \|",
    }
    planned = benchmark._planned_rows(dry_run=True)
    mapped = {(kind, dtype, benchmark.DRY_RUN_BATCH[kind], variant) for kind, dtype, _, variant in benchmark.ROWS}
    assert set(planned) == mapped and len(planned) == len(mapped) + 1  # every kind of row; one train row twice
    for row in set(planned):
        kind, dtype, batch, variant = row
        pattern = expected[kind].format(name=re.escape(benchmark.VARIANT_NAMES[variant]), dtype=re.escape(dtype),
                                        batch=batch)
        assert len(re.findall(pattern, text)) == planned.count(row), f"{row}:\n{text}"
    # The repeated train row loads its compiled step from the persistent cache.
    assert "(cached)" in text


def test_the_train_step_needs_no_tensorflow():
    """The benchmark imports train.py's step on a machine without TensorFlow: importing train must not import it."""
    result = subprocess.run([sys.executable, "-c", "import sys; import maskrcnn_jax.train; "
                             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                             "('tensorflow', 'tensorflow_datasets')))"],
                            capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]", result.stdout
