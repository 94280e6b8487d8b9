"""Data parallelism over a 1-D `Mesh(devices, ('data',))`: batches are sharded `P('data')`, the train state is
replicated. Every process reads its own rows of a global batch and `jax.make_array_from_process_local_data`
assembles it. The same code runs on one CPU, 8 GPUs or a TPU pod."""

from __future__ import annotations

import collections
import os
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree, mesh: Mesh):
    """Host (or single-device) arrays that are equal on every process -> global arrays replicated over the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, keys: Sequence[str]) -> dict[str, jax.Array]:
    """This process' rows of the batch -> global arrays sharded over the mesh's 'data' axis."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, local_batch[k]) for k in keys}


def device_batches(local_batches: Iterator[Mapping[str, np.ndarray]], count: int, mesh: Mesh, keys: Sequence[str],
                   ahead: int = 2) -> Iterator[tuple[Mapping[str, np.ndarray], dict[str, jax.Array]]]:
    """(local batch, global batch) for the next `count` batches, each global batch sent to the devices `ahead`
    batches before it is handed out, so that its host-to-device copy overlaps the steps before it. Exactly `count`
    batches are read from `local_batches`."""
    in_flight = collections.deque()

    def send():
        local = next(local_batches)
        in_flight.append((local, global_batch(local, mesh, keys)))

    for _ in range(min(ahead, count)):
        send()
    for handed_out in range(count):
        if handed_out + len(in_flight) < count:
            send()
        yield in_flight.popleft()


def local_rows(array: jax.Array) -> np.ndarray:
    """This process' rows of a global array sharded over 'data' (all rows of a replicated one), in order."""
    if array.is_fully_replicated:
        return np.asarray(array.addressable_data(0))
    shards = {}
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        shards.setdefault(start, shard.data)  # a row block may sit on several local devices
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def local_batch_size(global_size: int, name: str, mesh: Mesh) -> int:
    """The rows of a global batch that this process reads; the global size must split over devices and processes."""
    if global_size % mesh.size or global_size % jax.process_count():
        raise ValueError(f"{name}={global_size} must be divisible by the {mesh.size} devices and "
                         f"{jax.process_count()} processes")
    return global_size // jax.process_count()


def gather_to_all(values: Any) -> list[Any]:
    """One JSON-serialisable value per process -> the list of every process' value, on every process."""
    import json

    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return [values]
    payload = np.frombuffer(json.dumps(values).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([payload.size], np.int64)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: payload.size] = payload
    gathered = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]


def in_cluster(environ=os.environ) -> bool:
    """Whether this process is one of several that jax.distributed must connect."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(environ.get("SLURM_NTASKS", "1")) > 1 or int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    # Multi-host TPU slices list their workers; a single host lists one.
    return "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(mode: str = "auto", environ=os.environ) -> None:
    """`jax.distributed.initialize()` when `mode` is 'on', or 'auto' and a cluster is detected (SLURM, Open MPI,
    a multi-host TPU slice, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set explicitly)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed must be auto, on or off, got {mode!r}")
    if mode == "off" or (mode == "auto" and not in_cluster(environ)):
        return
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
