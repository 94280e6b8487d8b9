"""Data parallelism over a 1-D `Mesh(devices, ('data',))`: batches are sharded `P('data')`, the train state is
replicated. Every process reads its own rows of a global batch and `jax.make_array_from_process_local_data`
assembles it. The same code runs on one CPU, 8 GPUs or a TPU pod.

Evaluation's results reach process 0, the one that scores them, through gather_to_process_zero: every process'
compact arrays are written to the shared workdir and read there by process 0 alone, rather than all-gathered to
every process (its doc weighs the two)."""

from __future__ import annotations

import collections
import os
from typing import Iterator, Mapping, Sequence

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


def gather_to_process_zero(arrays: Mapping[str, np.ndarray], shard_paths: Sequence[str], name: str
                           ) -> list[dict[str, np.ndarray]] | None:
    """Each process' named NumPy arrays -> the list of every process' arrays, in process order, on process 0 alone
    (None on the others). `shard_paths` names one file per process in a folder that every process sees.

    Every other process writes its arrays there (.npz, read back with allow_pickle=False), all meet at a barrier
    (sync_global_devices, `name`), and process 0 reads the files and deletes them. Multi-host training already
    needs such a folder, the workdir, for its Orbax checkpoints. Against a compact all-gather
    (multihost_utils.process_allgather of the bytes), which pads every process' buffer to the longest and hands all
    of them to every process through the devices' memory, the files cross the network once, to the one reader,
    and take no device memory."""
    if jax.process_count() == 1:
        return [dict(arrays)]
    if len(shard_paths) != jax.process_count():
        raise ValueError(f"{len(shard_paths)} shard paths for {jax.process_count()} processes")
    from jax.experimental import multihost_utils

    index = jax.process_index()
    if index != 0:  # process 0 keeps its own arrays in memory
        partial = shard_paths[index] + ".partial"
        with open(partial, "wb") as f:
            np.savez(f, **arrays)
        os.replace(partial, shard_paths[index])  # whole or absent, whatever the barrier's timing
    multihost_utils.sync_global_devices(name)
    if index != 0:
        return None
    gathered = [dict(arrays)]
    for path in shard_paths[1:]:
        with np.load(path, allow_pickle=False) as shard:
            gathered.append({k: shard[k] for k in shard.files})
        os.remove(path)
    return gathered


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
