"""`Predictor`: a trained (or imported) model applied to images of any size, with results in their own pixels.

    predictor = Predictor.from_checkpoint("workdir/shapes_demo")
    result = predictor(image)                      # uint8 H x W x 3, H x W (gray) or H x W x 4 (RGBA)
    result["boxes"], result["scores"], result["labels"], result["names"], result["masks"]
    results = predictor([image1, image2, ...])     # run as batches of `batch_size`

Each image is resized and padded on the host (serving.host, which the exported model and evaluation share): to the
config's fixed canvas (data.eval_canvas "fixed", one compiled network for every image), or to its own canvas, a
multiple of data.size_divisibility (data.eval_canvas "padded", as torchvision and detectron2 pad). Then a list of
images runs in batches of one canvas each, and each distinct (batch, canvas) shape is compiled once and cached
(`compiled_shapes`); data.eval_canvas_step or data.eval_canvas_sides bound how many there can be.
`score_threshold` only filters what is returned; evaluation never sees it.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from maskrcnn_jax.data.coco_format import CategoryMap
from maskrcnn_jax.data.keypoints import KeypointSchema
from maskrcnn_jax.engine import checkpointing, workdir as workdir_lib
from maskrcnn_jax.layers.compile_options import compiler_options
from maskrcnn_jax.layers.host_memory import release_freed_memory
from maskrcnn_jax.modeling.mask_rcnn import build_model
from maskrcnn_jax.serving import host


class Predictor(host.ImagePredictor):
    """Images in, detections in original pixels and dataset category ids out (see the module doc)."""

    def __init__(self, config: ml_collections.ConfigDict, variables: Mapping[str, Any],
                 categories: CategoryMap | None = None, batch_size: int = 1,
                 keypoint_schema: KeypointSchema | None = None):
        self.config = config
        self.model = build_model(config.model)
        categories = categories or workdir_lib.numbered_categories(config.model.num_classes - 1)
        if categories.num_classes != config.model.num_classes - 1:
            raise ValueError(f"{categories.num_classes} categories for a model of {config.model.num_classes} classes "
                             "(background included)")
        if config.model.keypoint_on:
            keypoint_schema = keypoint_schema or workdir_lib.numbered_keypoints(
                config.model.keypoint_head.num_keypoints)
            if keypoint_schema.num_keypoints != config.model.keypoint_head.num_keypoints:
                raise ValueError(f"{keypoint_schema.num_keypoints} keypoint names for a model of "
                                 f"{config.model.keypoint_head.num_keypoints} keypoints")
        self.categories = categories
        self.keypoint_schema = keypoint_schema if config.model.keypoint_on else None
        self.spec = spec_from_config(config, categories, batch_size, self.keypoint_schema)
        self.variables = jax.device_put({"params": variables["params"],
                                         "batch_stats": variables.get("batch_stats", {})})
        self._network = jax.jit(self.network, compiler_options=compiler_options())
        self._compiled: dict[tuple[int, ...], Any] = {}  # canvases' shape [B, H, W, 3] -> compiled network

    @classmethod
    def from_checkpoint(cls, workdir: str, step: int | None = None, batch_size: int = 1) -> "Predictor":
        """The model of a training or import workdir: its config.json, categories and best (else latest)
        checkpoint."""
        config = workdir_lib.read_config(workdir)
        variables, step = checkpointing.restore_variables(workdir, config, step)
        logging.info("restored step %d from %s", step, workdir)
        return cls(config, variables, workdir_lib.read_categories(workdir, config), batch_size,
                   workdir_lib.read_keypoint_schema(workdir, config))

    def network(self, variables, images: jax.Array, image_sizes: jax.Array) -> dict[str, jax.Array]:
        """The jitted part: canvases [B, Hc, Wc, 3] and window sizes [B, 2] -> MaskRCNN.predict's fixed-size
        outputs."""
        return self.model.apply(variables, images, image_sizes, method=self.model.predict)

    @property
    def compiled_shapes(self) -> list[tuple[int, ...]]:
        """The [B, H, W, 3] canvas shapes compiled so far, one compile each."""
        return list(self._compiled)

    def compiled_network(self, shape: tuple[int, ...]):
        """The network compiled for canvases of `shape` [B, H, W, 3], compiled on first use and kept."""
        shape = tuple(int(v) for v in shape)
        if shape not in self._compiled:
            lowered = self._network.lower(self.variables, jax.ShapeDtypeStruct(shape, jnp.float32),
                                          jax.ShapeDtypeStruct((shape[0], 2), jnp.int32))
            self._compiled[shape] = lowered.compile()
            release_freed_memory()
            logging.info("compiled the network for canvases of shape %s (%d shapes so far)", shape,
                         len(self._compiled))
        return self._compiled[shape]

    def run_batch(self, canvases: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        network = self.compiled_network(canvases.shape)
        return jax.device_get(network(self.variables, jnp.asarray(canvases), jnp.asarray(image_sizes, jnp.int32)))


def spec_from_config(config: ml_collections.ConfigDict, categories: CategoryMap, batch_size: int,
                     keypoint_schema: KeypointSchema | None = None) -> host.InferenceSpec:
    d = config.data
    keypoints = {}
    if keypoint_schema is not None:
        keypoints = {"keypoint_names": tuple(keypoint_schema.names),
                     "keypoint_skeleton": tuple(tuple(p) for p in keypoint_schema.skeleton),
                     "keypoint_decode": config.eval.keypoint_decode}
    return host.InferenceSpec(
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
        eval_canvas=d.get("eval_canvas") or "fixed",
        size_divisibility=int(d.get("size_divisibility") or 32),
        eval_canvas_step=int(d.get("eval_canvas_step") or 0),
        eval_canvas_sides=tuple(int(v) for v in (d.get("eval_canvas_sides") or ())),
        **keypoints,
    )
