"""Shared timing and RESULTS.md helpers for the benchmarks: steady-state medians, side by side in one run."""

import pathlib
import platform
import statistics
import subprocess
import sys
import time

import jax

RESULTS_PATH = pathlib.Path(__file__).resolve().parent / "RESULTS.md"


def median_seconds(fn, *, repeats=7, warmup=1):
    """Median wall time of `fn()` after `warmup` calls; `fn` must block until its result is ready."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_jax(fn, *args, repeats=7):
    """(compile seconds, steady-state median seconds) of `jax.jit(fn)(*args)`."""
    jitted = jax.jit(fn)
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    compile_seconds = time.perf_counter() - start
    return compile_seconds, median_seconds(lambda: jax.block_until_ready(jitted(*args)), repeats=repeats)


# Instruction sets that decide which code the CPU kernels (XLA's, oneDNN's, YNNPACK's) run; /proc/cpuinfo names.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8")


def cpu_description():
    """The CPU's model name and which of CPU_FLAGS it has and lacks, from /proc/cpuinfo's first processor; the
    architecture alone where there is no /proc/cpuinfo."""
    try:
        first_processor = pathlib.Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return platform.machine()
    fields = dict(line.split(":", 1) for line in first_processor.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    has = " ".join(flag for flag in CPU_FLAGS if flag in flags) or "none"
    lacks = " ".join(flag for flag in CPU_FLAGS if flag not in flags) or "none"
    return f"{fields.get('model name', platform.machine())} ({platform.machine()}; has {has}; lacks {lacks})"


def head_commit():
    """The commit measured: the one checked out when the run starts (others may land while it runs)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS_PATH.parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_line():
    import os

    import numpy as np

    parts = [
        cpu_description(),
        f"{os.cpu_count()} cores",
        f"python {sys.version.split()[0]}",
        f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s))",
        f"numpy {np.__version__}",
    ]
    try:
        import torch
        import torchvision

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads), torchvision {torchvision.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def write_section(name, body):
    """Replace (or append) the section between `<!-- name:begin -->` and `<!-- name:end -->` in RESULTS.md."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = RESULTS_PATH.read_text() if RESULTS_PATH.exists() else "# Benchmark results\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS_PATH.write_text(text)
