"""What a run reports while it trains: TensorBoard scalars, the console progress line, and the check that every step
was finite (which names the step and the image ids when one was not)."""

from __future__ import annotations

import time
from typing import Mapping

import jax
import numpy as np
from absl import logging


class NonFiniteLossError(FloatingPointError):
    pass


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricWriter:
    """TensorBoard scalars on process 0 only, written with TensorFlow's own event writer (TensorFlow is installed for
    the input pipeline; the `tensorboard` package, which tf.summary.scalar needs, is not required)."""

    def __init__(self, logdir: str):
        self._writer = None
        if jax.process_index() == 0:
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2

            self._tf = tf
            self._metadata = summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
            self._writer = tf.summary.create_file_writer(logdir)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default():
            for name, value in scalars.items():
                self._tf.summary.write(name, self._tf.constant(float(value), self._tf.float32), step=step,
                                       metadata=self._metadata)
        self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()


class ProgressLog:
    """Collects per-step device metrics without syncing, and every `log_every` steps fetches them, checks that
    every step was finite, and logs the means of the finite ones plus images/s and an ETA.

    The train step itself leaves the state untouched on a non-finite step. With on_nonfinite="stop" such a step
    ends the run (NonFiniteLossError); with "skip" it is logged with its image ids and counted (train/skipped_steps),
    and only `max_consecutive_skips` of them in a row end the run.
    """

    def __init__(self, writer: MetricWriter, num_steps: int, global_batch_size: int, start_step: int,
                 on_nonfinite: str = "stop", max_consecutive_skips: int = 10):
        self.writer = writer
        self.num_steps = num_steps
        self.global_batch_size = global_batch_size
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.pending: list[tuple[int, dict[str, jax.Array], np.ndarray]] = []
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.start_time = time.perf_counter()
        self.start_step = start_step

    def add(self, step: int, metrics: dict[str, jax.Array], image_ids: np.ndarray) -> None:
        """`step` is the step number after the update (1-based); image_ids this process' ids of its batch."""
        self.pending.append((step, metrics, image_ids))
        self.window_steps += 1

    def check(self) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Fetches pending metrics and returns those of the finite steps. A non-finite step raises
        NonFiniteLossError naming the step and its image ids, or with on_nonfinite="skip" is logged and counted."""
        fetched = [(step, jax.device_get(metrics), ids) for step, metrics, ids in self.pending]
        self.pending = []
        finite = []
        for step, metrics, ids in fetched:
            if bool(metrics["finite"]):
                self.consecutive_skips = 0
                finite.append((step, metrics))
                continue
            losses = {k: float(v) for k, v in metrics.items() if k not in ("finite", "learning_rate")}
            message = (f"non-finite loss or gradient at step {step} (the update was skipped); image ids of this "
                       f"process' batch: {ids.tolist()}; values: {losses}")
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.on_nonfinite != "skip":
                raise NonFiniteLossError(message)
            if self.consecutive_skips >= self.max_consecutive_skips:
                raise NonFiniteLossError(f"{self.consecutive_skips} non-finite steps in a row (train."
                                         f"max_consecutive_skips); the last: {message}")
            logging.warning("%s (%d skipped so far)", message, self.skipped_steps)
        return finite

    def flush(self) -> None:
        fetched = self.check()
        if not fetched:
            return
        now = time.perf_counter()
        step = fetched[-1][0]
        means = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[0][1] if k != "finite"}
        means["learning_rate"] = float(fetched[-1][1]["learning_rate"])
        images_per_second = self.window_steps * self.global_batch_size / max(now - self.window_start, 1e-9)
        done = step - self.start_step
        eta = (now - self.start_time) / max(done, 1) * (self.num_steps - step)
        losses = " ".join(f"{k} {v:.4f}" for k, v in means.items()
                          if k not in ("loss", "grad_norm", "learning_rate"))
        logging.info("step %d/%d (%.1f%%) | loss %.4f | %s | lr %.3g | grad_norm %.3g | %.2f img/s | ETA %s",
                     step, self.num_steps, 100.0 * step / self.num_steps, means["loss"], losses,
                     means["learning_rate"], means["grad_norm"], images_per_second, format_duration(eta))
        self.writer.write(step, {**{f"train/{k}": v for k, v in means.items()},
                                 "train/images_per_second": images_per_second,
                                 "train/skipped_steps": self.skipped_steps})
        self.window_start, self.window_steps = now, 0
