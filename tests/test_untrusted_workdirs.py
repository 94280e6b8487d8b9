"""A workdir is not trusted to be whole or to be ours alone: a second run on a workdir in use stops with an error naming
the first (WORKDIR/train.lock), a stale lock is taken over, a corrupt newest checkpoint makes the resume fall back to
the newest one that restores (or stop naming each), and a save on a full or read-only disk stops with an error
naming the step and the OS error while the checkpoint before it stays readable.

The checkpoints are a tiny TrainState-shaped pytree saved once per module, copied into each test: no model, no
training."""

import errno
import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import multihost_utils

from maskrcnn_jax import train
from maskrcnn_jax.engine import checkpointing, workdir as workdir_lib
from maskrcnn_jax.engine.checkpointing import TrainState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_training import ROOT, tiny_config  # noqa: E402

STEPS = (1, 2, 3)
# After a failed restore or save, Orbax's asyncio helpers report "Event loop is closed" from a finished loop.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def tiny_state(step):
    params = {"w": jnp.full((2, 3), float(step)), "b": jnp.arange(3.0) + step}
    tx = optax.sgd(0.1, momentum=0.9)
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(step)))


@pytest.fixture(scope="module")
def config():
    config = tiny_config("/unused")
    config.train.max_checkpoints_to_keep = len(STEPS)
    return config


@pytest.fixture(scope="module")
def saved(tmp_path_factory, config):
    """A workdir with checkpoints of steps 1, 2, 3 (batches_consumed 10 x step)."""
    workdir = str(tmp_path_factory.mktemp("saved"))
    manager = checkpointing.checkpoint_manager(workdir, config)
    for step in STEPS:
        checkpointing.save_checkpoint(manager, tiny_state(step), 10 * step)
    manager.wait_until_finished()
    manager.close()
    return workdir


@pytest.fixture
def copied(saved, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(saved, workdir)
    return workdir


def restore_latest(workdir, config, set_aside=True):
    manager = checkpointing.checkpoint_manager(workdir, config)
    try:
        set_aside_dir = workdir_lib.unreadable_checkpoint_dir(workdir) if set_aside else None
        return checkpointing.restore_latest(manager, tiny_state(0), set_aside_dir)
    finally:
        manager.close()


def step_dir(workdir, step):
    return os.path.join(workdir_lib.checkpoint_dir(workdir), str(step))


def truncate_arrays(directory):
    for path in glob.glob(os.path.join(directory, "state", "**", "d", "*"), recursive=True):
        os.truncate(path, 0)


def overwrite_metadata(directory):
    with open(os.path.join(directory, "state", "_METADATA"), "w") as f:
        f.write('{"tree_metadata": {')


def remove_data_item(directory):
    shutil.rmtree(os.path.join(directory, "data"))


# ----------------------------------------------------------------------------------------------------
# The lock.


@pytest.fixture
def other_process():
    """A live process on this host, standing for another training run."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


def write_lock(workdir, host, pid):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, workdir_lib.LOCK_FILE), "w") as f:
        f.write(json.dumps({"host": host, "pid": pid, "started": "2026-01-02T03:04:05+00:00",
                            "command": "python -m maskrcnn_jax.main --workdir=elsewhere"}) + "\n")


def test_a_second_run_on_a_workdir_in_use_stops_naming_the_first(tmp_path, other_process):
    workdir = str(tmp_path / "run")
    write_lock(workdir, socket.gethostname(), other_process.pid)
    with pytest.raises(workdir_lib.WorkdirLockedError) as error:
        workdir_lib.TrainingLock(workdir).acquire()
    message = str(error.value)
    assert f"pid {other_process.pid} on host {socket.gethostname()}" in message
    assert "2026-01-02T03:04:05" in message and workdir_lib.LOCK_FILE in message
    assert json.loads(open(os.path.join(workdir, workdir_lib.LOCK_FILE)).read())["pid"] == other_process.pid

    # Two locks in one process: the second is refused too, and the first is released by its context on an error.
    other = str(tmp_path / "other")
    with pytest.raises(RuntimeError, match="boom"):
        with workdir_lib.TrainingLock(other):
            held = json.loads(open(os.path.join(other, workdir_lib.LOCK_FILE)).read())
            assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
            with pytest.raises(workdir_lib.WorkdirLockedError, match="already locked by this process"):
                workdir_lib.TrainingLock(other).acquire()
            raise RuntimeError("boom")
    assert not os.path.exists(os.path.join(other, workdir_lib.LOCK_FILE))
    with workdir_lib.TrainingLock(other):  # and can be taken again
        pass


def test_a_stale_lock_on_this_host_is_taken_over_with_a_warning(tmp_path, other_process, caplog):
    workdir = str(tmp_path / "run")
    other_process.kill()
    other_process.wait()
    write_lock(workdir, socket.gethostname(), other_process.pid)
    with workdir_lib.TrainingLock(workdir):
        held = json.loads(open(os.path.join(workdir, workdir_lib.LOCK_FILE)).read())
        assert held["pid"] == os.getpid()
    assert f"process {other_process.pid} on this host is no longer running" in caplog.text
    assert os.listdir(workdir) == []  # released, and no renamed stale lock left behind


def test_a_lock_from_another_host_or_unreadable_is_refused_saying_how_to_remove_it(tmp_path):
    workdir = str(tmp_path / "run")
    lock_path = os.path.join(workdir, workdir_lib.LOCK_FILE)
    write_lock(workdir, "some-other-host", 12345)
    with pytest.raises(workdir_lib.WorkdirLockedError) as error:
        workdir_lib.TrainingLock(workdir).acquire()
    assert "pid 12345 on host some-other-host" in str(error.value)
    assert "cannot be checked" in str(error.value) and f"remove {lock_path}" in str(error.value)
    with open(lock_path, "w") as f:
        f.write("not json\n")
    with pytest.raises(workdir_lib.WorkdirLockedError, match=f"cannot be read.*remove {lock_path}"):
        workdir_lib.TrainingLock(workdir).acquire()


def test_training_takes_the_lock_and_evaluation_only_does_not(tmp_path, other_process, monkeypatch):
    config = tiny_config("/unused")
    workdir = str(tmp_path / "run")
    lock_path = os.path.join(workdir, workdir_lib.LOCK_FILE)
    calls = []

    def body(config, workdir):
        calls.append((config.train.eval_only, os.path.exists(lock_path)))
        return {"bbox_AP": 1.0}

    monkeypatch.setattr(train, "_train_and_evaluate", body)
    train.train_and_evaluate(config, workdir)
    assert calls == [(False, True)] and not os.path.exists(lock_path)

    write_lock(workdir, socket.gethostname(), other_process.pid)  # another run trains in this workdir
    with pytest.raises(workdir_lib.WorkdirLockedError, match=f"pid {other_process.pid}"):
        train.train_and_evaluate(config, workdir)
    config.train.eval_only = True
    assert train.train_and_evaluate(config, workdir) == {"bbox_AP": 1.0}
    assert calls == [(False, True), (True, True)]


@pytest.mark.parametrize("process_index, process_0_locked", [(0, True), (0, False), (1, True), (1, False)])
def test_with_several_processes_process_0_holds_the_lock_for_all(tmp_path, monkeypatch, other_process,
                                                                 process_index, process_0_locked):
    workdir = str(tmp_path / "run")
    lock_path = os.path.join(workdir, workdir_lib.LOCK_FILE)
    if not process_0_locked:
        write_lock(workdir, socket.gethostname(), other_process.pid)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: process_index)
    broadcasts = []

    def broadcast(value):  # what process 0 sends: whether it holds the lock
        broadcasts.append(int(value))
        return np.asarray(process_0_locked, np.int32)

    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
    if process_0_locked:
        with train.workdir_lock(workdir):
            assert os.path.exists(lock_path) == (process_index == 0)
        assert not os.path.exists(lock_path)
    else:
        match = f"pid {other_process.pid}" if process_index == 0 else "process 0 could not lock"
        with pytest.raises(workdir_lib.WorkdirLockedError, match=match):
            with train.workdir_lock(workdir):
                pytest.fail("entered a workdir another run holds")
        assert json.loads(open(lock_path).read())["pid"] == other_process.pid  # the other run's lock is untouched
    assert len(broadcasts) == 1  # every process takes part, so none is left waiting


# ----------------------------------------------------------------------------------------------------
# Corrupt checkpoints.


@pytest.mark.parametrize("corrupt", [truncate_arrays, overwrite_metadata, remove_data_item])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_readable(copied, config, corrupt, caplog):
    corrupt(step_dir(copied, 3))
    state, consumed = restore_latest(copied, config)
    assert int(state.step) == 2 and consumed == 20
    np.testing.assert_array_equal(state.params["w"], np.full((2, 3), 2.0))
    assert f"checkpoint step 3 in {workdir_lib.checkpoint_dir(copied)} does not restore" in caplog.text
    assert "resuming from step 2" in caplog.text

    # The unreadable one is set aside, out of the way of the resumed run's own save of step 3.
    assert os.path.isdir(os.path.join(workdir_lib.unreadable_checkpoint_dir(copied), "3"))
    manager = checkpointing.checkpoint_manager(copied, config)
    try:
        assert sorted(manager.all_steps()) == [1, 2]
        checkpointing.save_checkpoint(manager, tiny_state(3), 31)
        checkpointing.finish_saves(manager)
    finally:
        checkpointing.close_manager(manager)
    state, consumed = restore_latest(copied, config)
    assert int(state.step) == 3 and consumed == 31


def test_no_readable_checkpoint_stops_naming_each_and_moves_nothing(copied, config):
    for step in STEPS:
        truncate_arrays(step_dir(copied, step))
    with pytest.raises(checkpointing.CheckpointRestoreError) as error:
        restore_latest(copied, config)
    message = str(error.value)
    assert f"no checkpoint in {workdir_lib.checkpoint_dir(copied)} restores" in message
    for step in STEPS:
        assert f"checkpoint step {step} in" in message
    assert sorted(os.listdir(workdir_lib.checkpoint_dir(copied))) == ["1", "2", "3"]
    assert not os.path.exists(workdir_lib.unreadable_checkpoint_dir(copied))

    # Asked for one step (evaluation, prediction): the error names it, and there is no fallback.
    manager = checkpointing.checkpoint_manager(copied, config)
    try:
        with pytest.raises(checkpointing.CheckpointRestoreError, match=f"checkpoint step 2 in .*{copied}"):
            checkpointing.restore_checkpoint(manager, tiny_state(0), 2)
    finally:
        manager.close()


def test_an_empty_workdir_has_nothing_to_resume(tmp_path, config):
    assert restore_latest(str(tmp_path / "fresh"), config) is None


# ----------------------------------------------------------------------------------------------------
# A full or read-only disk.


@pytest.mark.parametrize("when", ["in the background", "at the start"])
def test_a_failed_save_names_the_step_and_the_os_error_and_keeps_the_last_checkpoint(copied, config, monkeypatch,
                                                                                     when):
    directory = workdir_lib.checkpoint_dir(copied)
    manager = checkpointing.checkpoint_manager(copied, config)
    if when == "at the start":
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), directory)

        monkeypatch.setattr(manager, "save", read_only)
        expected = "EROFS"
    elif os.geteuid() != 0:
        os.chmod(directory, 0o555)  # a real read-only folder (root writes through it)
        expected = "EACCES"
    else:
        # Orbax's own writes inside the new checkpoint's temporary folder fail as on a full disk.
        path_type = type(manager.directory)
        write_text = path_type.write_text

        def full_disk(self, *args, **kwargs):
            if "orbax-checkpoint-tmp" in str(self):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return write_text(self, *args, **kwargs)

        monkeypatch.setattr(path_type, "write_text", full_disk)
        expected = "ENOSPC"
    try:
        with pytest.raises(checkpointing.CheckpointSaveError) as error:
            checkpointing.save_checkpoint(manager, tiny_state(4), 40)
            checkpointing.close_manager(manager)  # an asynchronous save's failure surfaces here
    finally:
        os.chmod(directory, 0o755)
        monkeypatch.undo()
        checkpointing.close_manager(manager, quiet=True)
    message = str(error.value)
    assert f"could not save step 4 to {directory}" in message and expected in message
    assert "step 3, is untouched" in message

    state, consumed = restore_latest(copied, config)
    assert int(state.step) == 3 and consumed == 30
    np.testing.assert_array_equal(state.params["b"], np.arange(3.0) + 3)


def test_the_command_line_refuses_a_workdir_in_use_in_one_line(tmp_path, other_process):
    workdir = tmp_path / "run"
    write_lock(str(workdir), socket.gethostname(), other_process.pid)
    result = subprocess.run(
        [sys.executable, "-m", "maskrcnn_jax.main", f"--config={ROOT / 'configs' / 'test.py'}", f"--workdir={workdir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"WorkdirLockedError: {workdir} is in use by another training run (pid {other_process.pid}" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(workdir)) == ["logs", workdir_lib.LOCK_FILE]  # nothing else written
