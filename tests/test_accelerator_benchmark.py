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
    assert len(planned) == len(benchmark.ROWS)
    for row in set(planned):
        kind, dtype, batch, variant = row
        pattern = expected[kind].format(name=re.escape(benchmark.VARIANT_NAMES[variant]), dtype=re.escape(dtype),
                                        batch=batch)
        assert len(re.findall(pattern, text)) == planned.count(row), f"{row}:\n{text}"
    # A row that repeats another's shapes and dtype loads the compiled step from the cache.
    assert "(cached)" in text


def _names(code):
    """Every name a code object and the code nested in it (lambdas, closures) loads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _names(const)
    return names


def test_train_functions_are_train_py_own():
    """The benchmark compiles train_step and jit_train_step from train.py's source: the same lines, and every other
    module global they use is the object train.py's own functions see."""
    from maskrcnn_jax import train

    model_inputs, train_step, jit_train_step = _benchmark_module()._train_functions()
    assert model_inputs == train.MODEL_INPUTS
    for ours, theirs in ((train_step, train.train_step), (jit_train_step, train.jit_train_step)):
        assert (ours.__code__.co_filename, ours.__code__.co_firstlineno) == (
            theirs.__code__.co_filename, theirs.__code__.co_firstlineno)
        # Names the benchmark defines itself from the same source (jit_train_step calls train_step) are its own.
        used = {name for name in _names(theirs.__code__) if name in vars(train)} - {"train_step", "MODEL_INPUTS"}
        assert used, "no module globals found: the check would be vacuous"
        assert {name for name in used if ours.__globals__.get(name) is not vars(train)[name]} == set()
