"""Evaluation's per-image host work (map boxes back, paste masks as crops, RLE) spread over worker processes while
the caller predicts the next batch: submit a batch's predictions, predict the next one, and take the results, in
submission order, at the end.

Workers are fresh interpreters running host_worker.py (`python -m maskrcnn_jax.evaluation.host_worker`), started
with subprocess, not multiprocessing. 'fork' can deadlock a multithreaded JAX process. 'spawn' and 'forkserver' both
run multiprocessing.spawn.prepare in every child, which imports the parent's __main__ again (as __mp_main__) from
its name or path, whatever the forkserver's preload list says (the preload only affects the server itself): a
script's top level, `python -m maskrcnn_jax.main` with JAX and TensorFlow, would run once more per worker. A
subprocess imports only the worker module, and the pipes carry only .npz arrays, the spec's JSON and tracebacks.

A worker's exception comes back as its traceback and is raised here as WorkerError; a worker that dies is one too
(its pipe ends). The pool is a context manager: leaving it closes the workers' stdin, so they exit, and kills any
that does not within a few seconds."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from typing import Mapping

import numpy as np

from maskrcnn_jax.evaluation import host_worker, result_arrays
from maskrcnn_jax.serving import host

# Beyond this many workers a host's accelerators rarely keep up (see config.py's eval.host_workers).
MAX_AUTO_WORKERS = 8
_EXIT_SECONDS = 5.0


class WorkerError(RuntimeError):
    """A host worker raised, or exited, while it had a task."""


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and schedulers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(configured: int | None) -> int:
    """eval.host_workers: None = min(available cores, MAX_AUTO_WORKERS); 0 = in this process."""
    if configured is None:
        return min(available_cores(), MAX_AUTO_WORKERS)
    if configured < 0:
        raise ValueError(f"eval.host_workers must be None (automatic) or at least 0, got {configured}")
    return int(configured)


def _worker_environment() -> dict[str, str]:
    env = dict(os.environ)
    # The package as this process imports it, wherever it runs from (an installed copy or a checkout).
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(host_worker.__file__))))
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    # One thread each: the workers already share the cores, and NumPy's BLAS would oversubscribe them.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = "1"
    return env


class HostPool:
    """submit(predictions of n images) ... results() -> their result_arrays, in submission order. With 0 workers
    each submission is converted at once in this process (host_worker.task_results, the workers' own code)."""

    def __init__(self, workers: int, spec: host.InferenceSpec):
        self.num_workers = int(workers)
        self.spec = spec
        self._processes: list[subprocess.Popen] = []
        self._in_flight: dict[int, int] = {}  # worker -> its task's index
        self._finished: dict[int, dict[str, np.ndarray]] = {}
        self._order = collections.deque(range(self.num_workers))  # the next worker to hand a task to comes first
        self._submitted = 0

    @property
    def processes(self) -> tuple[subprocess.Popen, ...]:
        """The running workers (none before the first submission outside a `with`, or after close)."""
        return tuple(self._processes)

    def __enter__(self) -> "HostPool":
        # Started now, so that the workers' imports overlap the caller's first prediction (and its compile).
        if self.num_workers and not self._processes:
            self._start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _start(self) -> None:
        spec_json = self.spec.to_json().encode()
        env = _worker_environment()
        try:
            for _ in range(self.num_workers):
                process = subprocess.Popen([sys.executable, "-m", "maskrcnn_jax.evaluation.host_worker"],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
                self._processes.append(process)
                self._send(len(self._processes) - 1, host_worker.SPEC, spec_json)
        except BaseException:
            self.close()
            raise

    def _send(self, worker: int, kind: bytes, payload: bytes) -> None:
        try:
            host_worker.send(self._processes[worker].stdin, kind, payload)
        except (BrokenPipeError, ValueError) as error:
            raise self._died(worker) from error

    def _died(self, worker: int) -> WorkerError:
        process = self._processes[worker]
        try:
            code = process.wait(_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            code = None
        return WorkerError(f"evaluation host worker {worker} (pid {process.pid}) stopped answering "
                           f"(exit code {code}); its error, if any, is in this process' stderr")

    def _collect(self, worker: int) -> None:
        task = self._in_flight.pop(worker)
        message = host_worker.receive(self._processes[worker].stdout)
        if message is None:
            raise self._died(worker)
        kind, payload = message
        if kind == host_worker.ERROR:
            raise WorkerError(f"evaluation host worker {worker} failed:\n{payload.decode(errors='replace')}")
        self._finished[task] = host_worker.unpack_arrays(payload)

    def submit(self, predictions: Mapping[str, np.ndarray], image_ids, image_sizes, original_sizes) -> None:
        """Hands n images (predict's rows for them, [n, ...] each, and their metadata) to the workers, split into
        one contiguous part per worker. It waits only for a worker's previous part, never for this one's."""
        count = len(image_ids)
        if count == 0:
            return
        task = host_worker.make_task(predictions, image_ids, image_sizes, original_sizes)
        if self.num_workers == 0:
            self._finished[self._submitted] = host_worker.task_results(task, self.spec)
            self._submitted += 1
            return
        if not self._processes:
            self._start()
        for rows in np.array_split(np.arange(count), min(self.num_workers, count)):
            worker = self._order[0]
            self._order.rotate(-1)
            if worker in self._in_flight:
                self._collect(worker)
            part = {k: v[rows[0]:rows[-1] + 1] for k, v in task.items()}
            self._send(worker, host_worker.TASK, host_worker.pack_arrays(part))
            self._in_flight[worker] = self._submitted
            self._submitted += 1

    def results(self, with_masks: bool, num_keypoints: int | None) -> dict[str, np.ndarray]:
        """Every submitted image's result_arrays, in submission order (result_arrays.empty when there were none)."""
        for worker in sorted(self._in_flight, key=self._in_flight.get):
            self._collect(worker)
        if not self._finished:
            return result_arrays.empty(with_masks, num_keypoints)
        return result_arrays.concatenate([self._finished[i] for i in range(self._submitted)])

    def close(self) -> None:
        """Ends the workers: their stdin closes, so they finish; one that does not is killed."""
        for process in self._processes:
            for stream in (process.stdin, process.stdout):
                try:
                    stream.close()
                except OSError:  # a dead worker's pipe
                    pass
        for process in self._processes:
            try:
                process.wait(_EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes = []
        self._in_flight.clear()
