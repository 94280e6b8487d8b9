"""engine/parallel.py pieces that need no model: batches sent to the devices ahead of the step, this process' rows
of a global array, and the multi-process gather on one process."""

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


def test_gather_to_all_on_one_process_is_the_value():
    assert parallel.gather_to_all({"results": [1, 2]}) == [{"results": [1, 2]}]
