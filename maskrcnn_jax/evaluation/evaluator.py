"""COCO evaluation of any predict function over the evaluation split (detectron2's inference_on_dataset, big_vision's
evaluators): it knows nothing of training.

Each process predicts, pastes and RLE-encodes only its own shard of the split; process 0 gathers the results, runs
COCOeval once and writes the files, and every process returns the same metrics. Within a process the per-image host
work (map boxes back, paste masks as crops, RLE) runs in eval.host_workers worker processes (host_pool.HostPool)
while the devices predict the next batch, and comes back as compact arrays (result_arrays); the other processes'
reach process 0 as files in the workdir (engine.parallel.gather_to_process_zero:
eval/step_XXXXXXXX_shard-0000i-of-0000n.npz, deleted once read), where they become the result dicts.

The batches are on the config's canvas: the fixed data.canvas_size, or with data.eval_canvas "padded" each image's
own padded canvas, grouped by canvas so that every batch has one shape and every process runs the same shapes in the
same order (data.pipeline's eval_plan); the predict function then compiles once per canvas. Each image is resized,
padded, mapped back and pasted exactly as the Predictor does it (serving.host), so the metrics are those of the
Predictor's results. Into the workdir go
    eval/step_XXXXXXXX_results.json     the COCO results JSON (bbox and segmentation per detection)
    eval/step_XXXXXXXX_per_class.txt    a per-class AP table (AP@[.5:.95], all areas, maxDets = eval.max_dets)
    eval_metrics.jsonl                  one appended line: {"step", "bbox_AP", ..., "segm_ARl", "keypoints_AP", ...}
                                        (coco.metric_keys of what the model predicts)
and, with eval.num_overlays > 0, overlay PNGs of the first validation images in overlays/step_XXXXXXXX/.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from pycocotools.coco import COCO

from maskrcnn_jax.data import pipeline
from maskrcnn_jax.data.coco_format import CategoryMap
from maskrcnn_jax.data.keypoints import KeypointSchema
from maskrcnn_jax.data.transforms import InputOptions
from maskrcnn_jax.engine import parallel, workdir as workdir_lib
from maskrcnn_jax.evaluation import coco, host_pool, result_arrays
from maskrcnn_jax.serving import host, visualize
from maskrcnn_jax.serving.predictor import spec_from_config

# The fields of an evaluation batch that a predict function reads.
PREDICT_INPUTS = ("image", "image_size")
# predict_fn(this process' rows of an eval batch) -> this process' rows of MaskRCNN.predict's outputs.
PredictFn = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def ground_truth_json(sources: Mapping[str, Any], builder, split: str) -> str:
    """The annotation JSON of the evaluation split: the configured val_json, else the one the dataset was built
    from."""
    if sources.get("val_json"):
        return sources["val_json"]
    built_from = builder.info.metadata.get("sources", {})
    if split in built_from:
        return built_from[split]["json"]
    raise ValueError(f"no annotation JSON for split '{split}': set data.val_json")


class CocoEvaluator:
    """Scores a predict function on the eval split with COCOeval (see the module doc)."""

    def __init__(self, config: ml_collections.ConfigDict, builder, sources: Mapping[str, Any],
                 categories: CategoryMap, workdir: str, keypoint_schema: KeypointSchema | None = None):
        self.config = config
        self.builder = builder
        self.sources = dict(sources)
        self.categories = categories
        self.workdir = workdir
        self.options = InputOptions.from_config(config.data)
        self.iou_types = coco.iou_types(config.model)
        self.metric_keys = coco.metric_keys(self.iou_types)
        self.sigmas = None
        if config.model.keypoint_on:
            if keypoint_schema is None:
                raise ValueError("a keypoint model's evaluation needs the dataset's keypoint schema")
            self.sigmas = coco.oks_sigmas(config.eval.kpt_oks_sigmas, keypoint_schema.oks_sigmas,
                                          keypoint_schema.num_keypoints)
        self.keypoint_schema = keypoint_schema
        # The Predictor's own host side: detections are mapped, pasted and decoded exactly as it does.
        self.spec = spec_from_config(config, categories, 1, keypoint_schema)
        self._coco_gt = None

    def coco_gt(self) -> COCO:
        if self._coco_gt is None:
            path = ground_truth_json(self.sources, self.builder, self.config.data.eval_split)
            self._coco_gt = coco.quiet(COCO, path)
        return self._coco_gt

    def local_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """This process' rows of each evaluation batch (data.pipeline.eval_batches)."""
        return pipeline.eval_batches(self.builder, self.options,
                                     batch_size=self.config.eval.batch_size // jax.process_count(),
                                     shard_index=jax.process_index(), shard_count=jax.process_count(),
                                     split=self.config.data.eval_split)

    def predicted_batches(self, predict_fn: PredictFn
                          ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """(predictions, metadata {'image_id', 'image_size', 'original_size'}) of each batch's real examples, as
        arrays [n, ...]. The next batch is predicted only when the caller asks for it."""
        for local in self.local_batches():
            outputs = predict_fn({k: local[k] for k in PREDICT_INPUTS})
            rows = np.flatnonzero(local["example_valid"])
            yield ({k: np.asarray(v)[rows] for k, v in outputs.items()},
                   {k: np.asarray(local[k])[rows] for k in ("image_id", "image_size", "original_size")})

    def local_predictions(self, predict_fn: PredictFn) -> Iterator[tuple[dict[str, np.ndarray], dict[str, Any]]]:
        """(predictions, metadata) of each real example of this process' shard of the split."""
        for outputs, meta in self.predicted_batches(predict_fn):
            for i, image_id in enumerate(meta["image_id"]):
                yield ({k: v[i] for k, v in outputs.items()},
                       {"image_id": int(image_id), "image_size": meta["image_size"][i],
                        "original_size": meta["original_size"][i]})

    def local_result_arrays(self, predict_fn: PredictFn, overlays: list | None = None) -> dict[str, np.ndarray]:
        """This process' results as result_arrays, the host work of each batch done by the host pool while the
        next batch is predicted; with `overlays`, the detections (full masks) of its first eval.num_overlays
        images are appended to it."""
        c = self.config.eval
        with host_pool.HostPool(host_pool.resolve_workers(c.get("host_workers")), self.spec) as pool:
            for outputs, meta in self.predicted_batches(predict_fn):
                pool.submit(outputs, meta["image_id"], meta["image_size"], meta["original_size"])
                for i in range(len(meta["image_id"])):
                    if overlays is None or len(overlays) >= c.num_overlays:
                        break
                    prepared = host.PreparedImage(None, tuple(int(v) for v in meta["image_size"][i]),
                                                  tuple(int(v) for v in meta["original_size"][i]))
                    detections = host.image_results({k: v[i] for k, v in outputs.items()}, prepared, self.spec,
                                                    score_threshold=-np.inf)
                    overlays.append((int(meta["image_id"][i]), detections))
            return pool.results("segm" in self.iou_types,
                                self.keypoint_schema.num_keypoints if "keypoints" in self.iou_types else None)

    def evaluate(self, predict_fn: PredictFn, step: int) -> dict[str, float]:
        """Predicts, scores, writes the files (process 0) and returns {metric key: value} on every process: the
        COCO stats of boxes, and of masks and keypoints as the model predicts them (coco.metric_keys)."""
        c = self.config.eval
        overlays = [] if jax.process_index() == 0 and c.num_overlays > 0 else None
        local = self.local_result_arrays(predict_fn, overlays)
        count = jax.process_count()
        shard_paths = [workdir_lib.eval_file(self.workdir, step, f"shard-{i:05d}-of-{count:05d}.npz")
                       for i in range(count)] if count > 1 else []
        gathered = parallel.gather_to_process_zero(local, shard_paths, f"evaluation results at step {step}")
        metrics = np.zeros(len(self.metric_keys), np.float64)
        if jax.process_index() == 0:
            merged = result_arrays.concatenate(gathered)
            results = result_arrays.to_results(merged)
            image_ids = merged["scored_image_ids"].tolist()
            values, per_class = coco.coco_metrics(self.coco_gt(), results, image_ids, c.max_dets, self.iou_types,
                                                  self.sigmas)
            metrics = np.asarray([values[k] for k in self.metric_keys], np.float64)
            self._write(step, results, values, per_class, overlays or [])
            logging.info("evaluation at step %d on %d images: %s", step, len(image_ids),
                         coco.headline({k: values[k] for k in self.metric_keys}))
        if jax.process_count() > 1:
            metrics = np.asarray(multihost_utils.broadcast_one_to_all(metrics))
        return {k: float(v) for k, v in zip(self.metric_keys, metrics)}

    def _write(self, step, results, metrics, per_class, overlays):
        with open(workdir_lib.eval_file(self.workdir, step, "results.json"), "w") as f:
            json.dump(results, f)
        table = coco.format_per_class_table(per_class, self.categories)
        with open(workdir_lib.eval_file(self.workdir, step, "per_class.txt"), "w") as f:
            f.write(table)
        logging.info("per-class AP at step %d:\n%s", step, table)
        workdir_lib.append_eval_metrics(self.workdir, step, {k: metrics[k] for k in self.metric_keys})
        if overlays:
            out_dir = workdir_lib.overlay_dir(self.workdir, step)
            visualize.write_overlays(out_dir, overlays, self.coco_gt(),
                                     self.sources.get("val_images") or self._built_images_dir(),
                                     self.config.eval.overlay_score_threshold, self.spec.keypoint_skeleton)
            logging.info("wrote %d overlay pictures to %s", len(overlays), out_dir)

    def _built_images_dir(self) -> str:
        return self.builder.info.metadata["sources"][self.config.data.eval_split]["images"]
