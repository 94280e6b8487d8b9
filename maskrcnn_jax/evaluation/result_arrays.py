"""COCO results as a few flat NumPy arrays instead of one dict per detection: what evaluation's host workers hand
back and what each process sends to process 0. Process 0 rebuilds the result dicts (`to_results`), equal to the
ones evaluation.coco.coco_result writes, key for key and bit for bit.

    image_id      int64 [N]
    category_id   int32 [N]
    score         float32 [N]
    box           float32 [N, 4]   xyxy in original pixels (COCO's xywh is made from these, as coco_result does)
    rle_counts    uint8 [total]    every detection's compressed COCO RLE counts, one after the other (masks only)
    rle_offsets   int64 [N + 1]    detection i's counts are rle_counts[rle_offsets[i]:rle_offsets[i + 1]]
    rle_size      int32 [N, 2]     (height, width) of each RLE
    keypoints     float32 [N, K, 3] (keypoint models only)
    scored_image_ids  int64 [M]    every image scored, with or without detections

Only NumPy: this module travels to the host workers (host_worker.py)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

FIELDS = ("image_id", "category_id", "score", "box", "rle_counts", "rle_offsets", "rle_size", "keypoints",
          "scored_image_ids")
MASK_FIELDS = ("rle_counts", "rle_offsets", "rle_size")


def image_arrays(image_id: int, category_ids, scores, boxes, rle_counts: Sequence[bytes] | None, image_size,
                 keypoints=None) -> dict[str, np.ndarray]:
    """One image's detections -> its arrays (see the module doc); rle_counts None for a model without masks."""
    count = len(scores)
    arrays = {"image_id": np.full(count, image_id, np.int64),
              "category_id": np.asarray(category_ids, np.int32).reshape(count),
              "score": np.asarray(scores, np.float32).reshape(count),
              "box": np.asarray(boxes, np.float32).reshape(count, 4),
              "scored_image_ids": np.asarray([image_id], np.int64)}
    if rle_counts is not None:
        arrays["rle_counts"] = np.frombuffer(b"".join(rle_counts), np.uint8)
        lengths = np.asarray([len(c) for c in rle_counts], np.int64)
        arrays["rle_offsets"] = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
        arrays["rle_size"] = np.tile(np.asarray(image_size, np.int32).reshape(1, 2), (count, 1))
    if keypoints is not None:
        arrays["keypoints"] = np.asarray(keypoints, np.float32)  # [count, K, 3]
    return arrays


def empty(with_masks: bool, num_keypoints: int | None) -> dict[str, np.ndarray]:
    """No detections and no images, of the kind a model predicts (for a process whose shard is empty)."""
    keypoints = None if num_keypoints is None else np.zeros((0, num_keypoints, 3), np.float32)
    arrays = image_arrays(0, [], [], np.zeros((0, 4)), [] if with_masks else None, (0, 0), keypoints)
    arrays["scored_image_ids"] = np.zeros(0, np.int64)
    return arrays


def concatenate(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays of several images (or processes), in order and of one kind, -> one set of arrays."""
    if not parts:
        raise ValueError("nothing to concatenate: use empty() for no images")
    keys = [k for k in FIELDS if k in parts[0]]
    if any(set(p) != set(keys) for p in parts):
        raise ValueError("result arrays of different kinds (with and without masks or keypoints)")
    out = {k: np.concatenate([p[k] for p in parts]) for k in keys if k != "rle_offsets"}
    if "rle_offsets" in keys:
        starts = np.cumsum([0] + [p["rle_offsets"][-1] for p in parts[:-1]], dtype=np.int64)
        shifted = [p["rle_offsets"][1:] + start for p, start in zip(parts, starts)]
        out["rle_offsets"] = np.concatenate([np.zeros(1, np.int64)] + shifted)
    return out


def to_results(arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """The COCO result dicts, as coco_result makes them: Python floats of the float32 values, xywh from xyxy in
    float64 (Python's float arithmetic), RLE counts as str."""
    boxes = np.asarray(arrays["box"], np.float32).astype(np.float64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
    image_ids = np.asarray(arrays["image_id"]).tolist()
    category_ids = np.asarray(arrays["category_id"]).tolist()
    scores = np.asarray(arrays["score"], np.float32).astype(np.float64).tolist()
    results = [{"image_id": i, "category_id": c, "bbox": b, "score": s}
               for i, c, b, s in zip(image_ids, category_ids, xywh, scores)]
    if "rle_counts" in arrays:
        counts = bytes(np.asarray(arrays["rle_counts"], np.uint8))
        offsets = np.asarray(arrays["rle_offsets"]).tolist()
        sizes = np.asarray(arrays["rle_size"]).tolist()
        for result, start, end, size in zip(results, offsets[:-1], offsets[1:], sizes):
            result["segmentation"] = {"size": size, "counts": counts[start:end].decode("ascii")}
    if "keypoints" in arrays:
        points = np.asarray(arrays["keypoints"], np.float32).astype(np.float64)
        for result, flat in zip(results, points.reshape(len(points), int(np.prod(points.shape[1:]))).tolist()):
            result["keypoints"] = flat
    return results
