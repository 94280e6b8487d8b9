"""One evaluation host worker: batches of images' predictions in, their COCO results as result_arrays out (map
boxes back, paste masks as crops, RLE: evaluation.coco.image_result_arrays). host_pool.HostPool runs several as

    python -m maskrcnn_jax.evaluation.host_worker

and talks to each over its stdin and stdout. A worker is a fresh interpreter that runs this module and nothing of
its parent's, so the parent's __main__ (a script, `python -m maskrcnn_jax.main`, pytest, a notebook) is never
imported again, and it imports no JAX or TensorFlow: only NumPy, pycocotools and the NumPy-only serving.host.

The messages are framed as one kind byte, an 8-byte little-endian length and the payload. Arrays travel as .npz
bytes read with allow_pickle=False, the spec as its JSON, an error as its traceback's text: nothing is unpickled.
    parent -> worker   SPEC (first), then TASK: {"prediction.<key>": [n, ...], "image_id", "image_size",
                       "original_size": [n, ...]} for n images
    worker -> parent   RESULT (result_arrays of the n images, in order) or ERROR, one per TASK
The parent has at most one task in flight per worker, so neither side can block writing while the other does."""

from __future__ import annotations

import io
import os
import signal
import struct
import sys
import traceback
from typing import BinaryIO, Mapping

import numpy as np

from maskrcnn_jax.evaluation import coco, result_arrays
from maskrcnn_jax.serving import host

SPEC, TASK, RESULT, ERROR = b"S", b"T", b"R", b"E"
PREDICTION_PREFIX = "prediction."
_HEADER = struct.Struct("<cQ")


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack_arrays(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def send(stream: BinaryIO, kind: bytes, payload: bytes) -> None:
    stream.write(_HEADER.pack(kind, len(payload)))
    stream.write(payload)
    stream.flush()


def receive(stream: BinaryIO) -> tuple[bytes, bytes] | None:
    """(kind, payload), or None at the end of the stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    kind, length = _HEADER.unpack(header)
    payload = stream.read(length)
    if len(payload) < length:
        return None
    return kind, payload


def make_task(predictions: Mapping[str, np.ndarray], image_ids, image_sizes, original_sizes) -> dict[str, np.ndarray]:
    """n images' rows of predict's outputs and their metadata -> one TASK's arrays."""
    task = {PREDICTION_PREFIX + k: np.asarray(v) for k, v in predictions.items()}
    task.update(image_id=np.asarray(image_ids, np.int64), image_size=np.asarray(image_sizes, np.int64),
                original_size=np.asarray(original_sizes, np.int64))
    return task


def task_results(task: Mapping[str, np.ndarray], spec: host.InferenceSpec) -> dict[str, np.ndarray]:
    """A TASK's images -> their result_arrays, in order. The pool runs this in its workers, or in-process."""
    predictions = {k[len(PREDICTION_PREFIX):]: v for k, v in task.items() if k.startswith(PREDICTION_PREFIX)}
    parts = []
    for row, image_id in enumerate(task["image_id"]):
        arrays, _ = coco.image_result_arrays({k: v[row] for k, v in predictions.items()}, int(image_id),
                                             task["image_size"][row], task["original_size"][row], spec)
        parts.append(arrays)
    if not parts:
        raise ValueError("a task without images")
    return result_arrays.concatenate(parts)


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    spec = None
    while (message := receive(requests)) is not None:
        kind, payload = message
        try:
            if kind == SPEC:
                spec = host.InferenceSpec.from_json(payload.decode())
                continue
            if kind != TASK or spec is None:
                raise ValueError(f"unexpected message {kind!r} (spec received: {spec is not None})")
            reply = RESULT, pack_arrays(task_results(unpack_arrays(payload), spec))
        except Exception:  # handed to the parent, which raises it
            reply = ERROR, traceback.format_exc().encode()
        send(replies, *reply)


def main() -> None:
    # Ctrl-C reaches the whole process group: the parent handles it and closes our stdin, which ends the loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The messages keep stdin and stdout to themselves: anything printed goes to stderr.
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        with requests, replies:
            serve(requests, replies)
    except BrokenPipeError:  # the parent stopped listening (it is shutting the pool down after an error)
        os._exit(1)


if __name__ == "__main__":
    main()
