"""`Predictor`: a trained (or imported) model applied to images of any size, with results in their own pixels.

    predictor = Predictor.from_checkpoint("workdir/shapes_demo")
    result = predictor(image)                      # uint8 H x W x 3, H x W (gray) or H x W x 4 (RGBA)
    result["boxes"], result["scores"], result["labels"], result["names"], result["masks"]
    results = predictor([image1, image2, ...])     # run as batches of `batch_size`

One compiled network call serves every image: each is resized and padded to the config's canvas on the host
(inference_io, which the exported model shares). `score_threshold` only filters what is returned; evaluation never
sees it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from maskrcnn_jax import inference_io
from maskrcnn_jax.data.coco_format import CategoryMap
from maskrcnn_jax.modeling.mask_rcnn import build_model

CATEGORIES_FILE = "categories.json"
CONFIG_FILE = "config.json"


def write_categories(workdir: str, categories: CategoryMap) -> None:
    """The label map of a workdir's model, so that prediction needs neither the dataset nor its build."""
    with open(os.path.join(workdir, CATEGORIES_FILE), "w") as f:
        json.dump(categories.to_json(), f, indent=2)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: is {workdir} a training or import workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def read_categories(workdir: str, config: ml_collections.ConfigDict) -> CategoryMap:
    """WORKDIR/categories.json; else the built dataset's map; else labels 1..K named by number (logged)."""
    path = os.path.join(workdir, CATEGORIES_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return CategoryMap.from_json(json.load(f))
    try:
        from maskrcnn_jax.data import builder as data_builder

        return data_builder.load_category_map(data_builder.get_builder(config.data))
    except Exception as e:  # no dataset here: the names are unknown, the ids are the labels
        logging.warning("no %s in %s and no built dataset (%s): naming classes by label", CATEGORIES_FILE, workdir, e)
        return numbered_categories(config.model.num_classes - 1)


def numbered_categories(count: int) -> CategoryMap:
    """Category ids 1..count named class_1.. (when a model's label map is unknown)."""
    return CategoryMap(tuple(range(1, count + 1)), tuple(f"class_{k}" for k in range(1, count + 1)))


def checkpoint_step(workdir: str, manager) -> int:
    """The checkpoint with the best mask AP in WORKDIR/eval_metrics.jsonl, else the latest."""
    from maskrcnn_jax import train

    available = set(manager.all_steps())
    if not available:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    evaluated = [m for m in train.read_eval_metrics(workdir) if m["step"] in available]
    if evaluated:
        return int(max(evaluated, key=lambda m: m[train.BEST_METRIC])["step"])
    return int(manager.latest_step())


def restore_variables(workdir: str, config: ml_collections.ConfigDict, step: int | None = None
                      ) -> tuple[dict[str, Any], int]:
    """({'params', 'batch_stats'}, step) of WORKDIR/checkpoints at `step` (default: checkpoint_step)."""
    from maskrcnn_jax import train

    model = build_model(config.model)
    manager = train.checkpoint_manager(workdir, config)
    try:
        step = checkpoint_step(workdir, manager) if step is None else step
        abstract = jax.eval_shape(lambda: train.create_train_state(config, model)[0])
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
        state, _ = train.restore_checkpoint(manager, abstract, step)
    finally:
        manager.close()
    return state.variables(), step


class Predictor(inference_io.ImagePredictor):
    """Images in, detections in original pixels and dataset category ids out (see the module doc)."""

    def __init__(self, config: ml_collections.ConfigDict, variables: Mapping[str, Any],
                 categories: CategoryMap | None = None, batch_size: int = 1):
        self.config = config
        self.model = build_model(config.model)
        categories = categories or numbered_categories(config.model.num_classes - 1)
        if categories.num_classes != config.model.num_classes - 1:
            raise ValueError(f"{categories.num_classes} categories for a model of {config.model.num_classes} classes "
                             "(background included)")
        self.categories = categories
        self.spec = spec_from_config(config, categories, batch_size)
        self.variables = jax.device_put({"params": variables["params"],
                                         "batch_stats": variables.get("batch_stats", {})})
        self._network = jax.jit(self.network)

    @classmethod
    def from_checkpoint(cls, workdir: str, step: int | None = None, batch_size: int = 1) -> "Predictor":
        """The model of a training or import workdir: its config.json, categories and best (else latest)
        checkpoint."""
        config = read_config(workdir)
        variables, step = restore_variables(workdir, config, step)
        logging.info("restored step %d from %s", step, workdir)
        return cls(config, variables, read_categories(workdir, config), batch_size)

    def network(self, variables, images: jax.Array, image_sizes: jax.Array) -> dict[str, jax.Array]:
        """The jitted part: canvases [B, Hc, Wc, 3] and window sizes [B, 2] -> MaskRCNN.predict's fixed-size
        outputs."""
        return self.model.apply(variables, images, image_sizes, method=self.model.predict)

    def run_batch(self, canvases: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        return jax.device_get(self._network(self.variables, jnp.asarray(canvases), jnp.asarray(image_sizes)))


def spec_from_config(config: ml_collections.ConfigDict, categories: CategoryMap, batch_size: int
                     ) -> inference_io.InferenceSpec:
    d = config.data
    return inference_io.InferenceSpec(
        canvas_size=tuple(int(v) for v in d.canvas_size),
        short_side=d.get("short_side"),
        long_side_max=d.get("long_side_max"),
        size_rounding=d.get("size_rounding") or "round",
        pixel_mean=tuple(float(v) for v in d.pixel_mean),
        pixel_std=tuple(float(v) for v in d.pixel_std),
        mask_threshold=float(config.eval.mask_threshold),
        mask_paste=config.eval.get("mask_paste") or "detectron2",
        batch_size=int(batch_size),
        category_ids=tuple(categories.category_ids),
        names=tuple(categories.names),
    )
