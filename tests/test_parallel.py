"""engine/parallel.py pieces that need no model: batches sent to the devices ahead of the step, this process' rows
of a global array, and the gather of every process' arrays to process 0 (one process, and two in turn)."""

import jax
import numpy as np
import pytest

from maskrcnn_jax.engine import parallel


class CountingBatches:
    def __init__(self):
        self.read = 0

    def __next__(self):
        self.read += 1
        return {"x": np.full((2, 3), self.read, np.float32)}


@pytest.mark.parametrize("count, ahead", [(5, 2), (1, 2), (3, 1), (0, 2)])
def test_device_batches_send_ahead_in_order_and_read_exactly_count(count, ahead):
    mesh = parallel.make_mesh(jax.devices()[:1])
    source = CountingBatches()
    batches = parallel.device_batches(source, count, mesh, ("x",), ahead=ahead)
    for i, (local, batch) in enumerate(batches, start=1):
        # When batch i is handed out, the next ones (up to `ahead`, never past `count`) are already on the devices.
        assert source.read == min(i + ahead, count)
        assert local["x"][0, 0] == i
        np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
        assert isinstance(batch["x"], jax.Array)
    assert source.read == count


def test_local_rows_of_a_sharded_array_are_the_process_rows(rng):
    mesh = parallel.make_mesh(jax.devices()[:1])
    rows = rng.normal(size=(4, 3)).astype(np.float32)
    array = parallel.global_batch({"x": rows}, mesh, ("x",))["x"]
    np.testing.assert_array_equal(parallel.local_rows(array), rows)


def test_gather_to_process_zero_on_one_process_is_the_arrays(tmp_path):
    arrays = {"score": np.asarray([0.5], np.float32)}
    assert parallel.gather_to_process_zero(arrays, [], "one process") == [arrays]
    assert not list(tmp_path.iterdir())


def test_gather_to_process_zero_reads_every_shard_on_process_zero_alone(tmp_path, monkeypatch):
    """Two processes, one after the other: process 1 writes its shard and gets None; process 0 gets both shards'
    arrays in process order, bit for bit (bytes buffers, empty arrays), and deletes the file."""
    from jax.experimental import multihost_utils

    barriers = []
    monkeypatch.setattr(multihost_utils, "sync_global_devices", barriers.append)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    paths = [str(tmp_path / f"step_00000007_shard-{i:05d}-of-00002.npz") for i in range(2)]
    shards = [{"image_id": np.asarray([3, 3, 5], np.int64), "rle_counts": np.frombuffer(b"a1b\\2", np.uint8),
               "box": np.arange(12, dtype=np.float32).reshape(3, 4)},
              {"image_id": np.zeros(0, np.int64), "rle_counts": np.zeros(0, np.uint8),
               "box": np.zeros((0, 4), np.float32)}]
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert parallel.gather_to_process_zero(shards[1], paths, "results at step 7") is None
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000007_shard-00001-of-00002.npz"]
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    gathered = parallel.gather_to_process_zero(shards[0], paths, "results at step 7")
    assert barriers == ["results at step 7"] * 2
    assert len(gathered) == 2
    for ours, expected in zip(gathered, shards):
        assert set(ours) == set(expected)
        for key in expected:
            assert ours[key].dtype == expected[key].dtype
            np.testing.assert_array_equal(ours[key], expected[key])
    assert not list(tmp_path.iterdir())
