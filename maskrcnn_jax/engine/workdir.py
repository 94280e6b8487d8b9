"""The one owner of a workdir's files. Training, the importers, evaluation and prediction all read and write a
workdir through these functions:

    config.json           the full config of the run (or of the imported model)
    categories.json       the label map: contiguous label k <-> the dataset's category id and name
    keypoints.json        a keypoint model's keypoint names, skeleton and OKS sigmas
    train.lock            while a run trains: {"host", "pid", "started", "command"} of that run (TrainingLock)
    checkpoints/          Orbax checkpoints (engine.checkpointing)
    checkpoints_unreadable/<step>   checkpoints that failed to restore, set aside by the resume that skipped them
    eval_metrics.jsonl    one line per evaluation: {"step", "bbox_AP", ..., "segm_ARl"}
    eval/                 step_XXXXXXXX_results.json (COCO results) and step_XXXXXXXX_per_class.txt
    overlays/             step_XXXXXXXX/<image id>.png, pictures of predictions
    tensorboard/          TensorBoard event files
    logs/log.txt          everything the run logged, library messages included
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from typing import Iterable, Mapping

import ml_collections
from absl import logging

from maskrcnn_jax import config as config_lib
from maskrcnn_jax.data.coco_format import CategoryMap
from maskrcnn_jax.data.keypoints import KeypointSchema

CONFIG_FILE = "config.json"
CATEGORIES_FILE = "categories.json"
KEYPOINTS_FILE = "keypoints.json"
METRICS_FILE = "eval_metrics.jsonl"
LOCK_FILE = "train.lock"
# The evaluation metric that picks the best checkpoint (kept by Orbax, restored for prediction): mask AP, or for a
# model without masks keypoint AP, else box AP (best_metric).
BEST_METRIC = "segm_AP"


def best_metric(model_config) -> str:
    if model_config.get("mask_on", True):
        return BEST_METRIC
    return "keypoints_AP" if model_config.get("keypoint_on") else "bbox_AP"


def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def unreadable_checkpoint_dir(workdir: str) -> str:
    """WORKDIR/checkpoints_unreadable: where a resume moves the checkpoints it could not restore, out of Orbax's
    way (a new save of that step would collide with them) but kept for inspection."""
    return os.path.abspath(os.path.join(workdir, "checkpoints_unreadable"))


def tensorboard_dir(workdir: str) -> str:
    return os.path.join(workdir, "tensorboard")


def log_file(workdir: str) -> str:
    """WORKDIR/logs/log.txt (its folder created)."""
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    return os.path.join(workdir, "logs", "log.txt")


def step_name(step: int) -> str:
    return f"step_{int(step):08d}"


def eval_file(workdir: str, step: int, suffix: str) -> str:
    """WORKDIR/eval/step_XXXXXXXX_{suffix} (its folder created)."""
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    return os.path.join(workdir, "eval", f"{step_name(step)}_{suffix}")


def overlay_dir(workdir: str, step: int) -> str:
    return os.path.join(workdir, "overlays", step_name(step))


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """WORKDIR/config.json over the base config's defaults, so that a workdir written before a field existed reads
    with that field's default (which keeps the behaviour it was trained with)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: is {workdir} a training or import workdir?")
    with open(path) as f:
        saved = json.load(f)
    config = config_lib.base_config()
    _overlay(config, saved)
    return config


def _overlay(config: ml_collections.ConfigDict, saved: Mapping) -> None:
    """Writes `saved` (JSON: lists where the config has tuples) into `config`, section by section."""
    for key, value in saved.items():
        current = config.get(key) if key in config else None
        if isinstance(value, Mapping) and isinstance(current, ml_collections.ConfigDict):
            _overlay(current, value)
        elif isinstance(value, list) and isinstance(current, tuple):
            config[key] = _as_tuples(value)
        else:
            config[key] = value


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def write_categories(workdir: str, categories: CategoryMap) -> None:
    """The label map of a workdir's model, so that prediction needs neither the dataset nor its build."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CATEGORIES_FILE), "w") as f:
        json.dump(categories.to_json(), f, indent=2)


def numbered_categories(count: int) -> CategoryMap:
    """Category ids 1..count named class_1.. (when a model's label map is unknown)."""
    return CategoryMap(tuple(range(1, count + 1)), tuple(f"class_{k}" for k in range(1, count + 1)))


def read_categories(workdir: str, config: ml_collections.ConfigDict) -> CategoryMap:
    """WORKDIR/categories.json; else the built dataset's map; else labels 1..K named by number (logged)."""
    path = os.path.join(workdir, CATEGORIES_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return CategoryMap.from_json(json.load(f))
    try:
        from maskrcnn_jax.data import coco_dataset

        return coco_dataset.load_category_map(coco_dataset.get_builder(config.data))
    except Exception as e:  # no dataset here: the names are unknown, the ids are the labels
        logging.warning("no %s in %s and no built dataset (%s): naming classes by label", CATEGORIES_FILE, workdir, e)
        return numbered_categories(config.model.num_classes - 1)


def write_keypoint_schema(workdir: str, schema: KeypointSchema) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, KEYPOINTS_FILE), "w") as f:
        json.dump(schema.to_json(), f, indent=2)


def numbered_keypoints(count: int) -> KeypointSchema:
    """Keypoint types named keypoint_1.. (when a model's keypoint names are unknown)."""
    return KeypointSchema(tuple(f"keypoint_{k}" for k in range(1, count + 1)))


def read_keypoint_schema(workdir: str, config: ml_collections.ConfigDict) -> KeypointSchema | None:
    """A keypoint model's WORKDIR/keypoints.json; else the built dataset's schema; else numbered keypoints
    (logged). None for a model without keypoints."""
    if not config.model.get("keypoint_on"):
        return None
    path = os.path.join(workdir, KEYPOINTS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return KeypointSchema.from_json(json.load(f))
    try:
        from maskrcnn_jax.data import coco_dataset

        schema = coco_dataset.load_keypoint_schema(coco_dataset.get_builder(config.data))
        if schema is not None:
            return schema
    except Exception as e:  # no dataset here: the keypoint names are unknown
        logging.warning("no %s in %s and no built dataset (%s): naming keypoints by number", KEYPOINTS_FILE,
                        workdir, e)
    return numbered_keypoints(config.model.keypoint_head.num_keypoints)


def append_eval_metrics(workdir: str, step: int, metrics: Mapping[str, float]) -> None:
    with open(os.path.join(workdir, METRICS_FILE), "a") as f:
        f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")


def read_eval_metrics(workdir: str) -> list[dict[str, float]]:
    """The lines of WORKDIR/eval_metrics.jsonl, oldest first."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def best_step(workdir: str, available: Iterable[int], latest: int, metric: str = BEST_METRIC) -> int:
    """The available checkpoint with the best `metric` in eval_metrics.jsonl, else `latest`."""
    available = set(available)
    evaluated = [m for m in read_eval_metrics(workdir) if m["step"] in available and metric in m]
    if evaluated:
        return int(max(evaluated, key=lambda m: m[metric])["step"])
    return int(latest)


# ----------------------------------------------------------------------------------------------------
# The training lock.


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir (or may: its lock cannot be checked from here)."""


_HELD_LOCKS: set[str] = set()  # the lock files this process holds


class TrainingLock:
    """WORKDIR/train.lock, held while a run writes the workdir, so that a second run on the same workdir stops with
    an error naming the first instead of interleaving checkpoints with it.

    The file is created atomically (O_CREAT | O_EXCL, which also holds on NFS v3 and later) and holds JSON: host,
    pid, start time (UTC) and command line. A lock left by a run that died without releasing it (SIGKILL, a crash of
    the machine) is stale when it names this host and a pid that no longer runs (or this process's own pid, which
    only a previous life of a container can have written): it is taken over, with a warning. A lock written on
    another host cannot be checked from here, so it is refused with an error that says how to remove it. Use as a
    context manager; it is released on every exit that runs `finally` blocks (SIGTERM included, since training turns
    it into a normal stop), and only if the file is still this lock.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.abspath(os.path.join(workdir, LOCK_FILE))
        self._text: str | None = None

    def acquire(self) -> "TrainingLock":
        os.makedirs(self.workdir, exist_ok=True)
        if self.path in _HELD_LOCKS:
            raise WorkdirLockedError(f"{self.workdir} is already locked by this process ({self.path}): one training "
                                     "run per workdir")
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)}
        text = json.dumps(record) + "\n"
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder_text = _read_lock_text(self.path)
                if holder_text is None:
                    continue  # released in the meantime
                reason = self._stale_reason(holder_text)
                logging.warning("taking over the stale lock %s (%s): %s", self.path, reason, holder_text.strip())
                _remove_if_unchanged(self.path, holder_text)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            self._text = text
            _HELD_LOCKS.add(self.path)
            return self
        raise WorkdirLockedError(f"could not lock {self.workdir}: {self.path} kept changing; is another run starting "
                                 "on this workdir?")

    def _stale_reason(self, holder_text: str) -> str:
        """Why the lock in `holder_text` is stale; raises WorkdirLockedError when it is not (or cannot be told)."""
        remove = f"If no run is using {self.workdir}, remove {self.path} and start again."
        try:
            holder = json.loads(holder_text)
            host, pid, started = holder["host"], int(holder["pid"]), holder.get("started", "?")
        except (ValueError, KeyError, TypeError):
            raise WorkdirLockedError(f"{self.workdir} is locked by {self.path}, which cannot be read "
                                     f"({holder_text[:200]!r}). {remove}") from None
        who = f"pid {pid} on host {host}, started {started}: {holder.get('command', '?')}"
        this_host = socket.gethostname()
        if host != this_host:
            raise WorkdirLockedError(
                f"{self.workdir} is in use by another training run ({who}; lock file {self.path}). That host is not "
                f"this one ({this_host}), so whether the run is still alive cannot be checked from here. Wait for it "
                f"to finish, or train in another workdir. {remove}")
        if pid == os.getpid():
            return f"it names this process's own pid {pid}, so it was left by an earlier process with that pid"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"process {pid} on this host is no longer running"
        except PermissionError:
            pass  # it runs, under another user
        raise WorkdirLockedError(
            f"{self.workdir} is in use by another training run ({who}; lock file {self.path}). Wait for it to finish "
            f"or stop it, or train in another workdir. If process {pid} is not a training run (a reused pid), remove "
            f"{self.path} and start again.")

    def release(self) -> None:
        if self._text is None:
            return
        _HELD_LOCKS.discard(self.path)
        text, self._text = self._text, None
        if _read_lock_text(self.path) == text:
            os.unlink(self.path)
        else:
            logging.warning("%s is no longer this run's lock; leaving it", self.path)

    def __enter__(self) -> "TrainingLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_lock_text(path: str) -> str | None:
    """The lock file's text, None if there is none. A file just created by another run may still be empty: it is read
    again for up to a second before it counts as what it holds."""
    deadline = time.monotonic() + 1.0
    while True:
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        if text.endswith("\n") or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def _remove_if_unchanged(path: str, stale_text: str) -> None:
    """Removes the stale lock `path` if it still holds `stale_text`. It is first renamed to a name of this process's
    own, so that of two runs taking over at once only one removes the stale file; if the renamed file turns out to
    be a new run's fresh lock, it is put back."""
    aside = f"{path}.stale.{socket.gethostname()}.{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    with open(aside) as f:
        moved = f.read()
    if moved != stale_text:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    os.unlink(aside)
