"""The configured dataset, generated and built once per cluster: process 0 writes it, the others wait for it.

`data.name` and `data.data_dir` locate the built TFDS records. The sources they are built from are either the four
COCO-format paths (`data.train_json`, `data.train_images`, `data.val_json`, `data.val_images`) or a generated
dataset, `data.shapes` or `data.stick_figures` with `num_train > 0`, written into its `dir`. Asking for more than
one of these is an error that says what to set.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from maskrcnn_jax.data import coco_dataset, stick_figures, synthetic
from maskrcnn_jax.data.options import BuildOptions

SOURCE_FIELDS = ("train_json", "train_images", "val_json", "val_images")
# data.<section> -> (generate(out_dir, num_train, num_val, seed), the four paths of a written folder)
GENERATORS = {
    "shapes": (synthetic.generate, synthetic.shapes_data_paths),
    "stick_figures": (stick_figures.generate, stick_figures.stick_figures_data_paths),
}


def generated_section(data: ml_collections.ConfigDict) -> str | None:
    """The generated dataset the config asks for ('shapes' or 'stick_figures'), or None."""
    asked = [name for name in GENERATORS if name in data and data[name].num_train > 0]
    if len(asked) > 1:
        raise ValueError(f"{' and '.join(f'data.{n}.num_train' for n in asked)} are both set: generate one dataset")
    return asked[0] if asked else None


def dataset_sources(data: ml_collections.ConfigDict) -> dict[str, Any]:
    """{'name', 'data_dir', 'train_json', 'train_images', 'val_json', 'val_images'} of the configured dataset,
    with the BuildOptions fields (how its files are read). The config itself is left as it is."""
    if not data.data_dir:
        raise ValueError("data.data_dir must name the folder for the built dataset")
    sources = {"name": data.name, "data_dir": data.data_dir,
               **{field.name: data.get(field.name) for field in dataclasses.fields(BuildOptions)}}
    explicit = {field: data.get(field) for field in SOURCE_FIELDS}
    generated = generated_section(data)
    if generated is None:
        sources.update(explicit)
        return sources
    section = data[generated]
    given = [field for field, value in explicit.items() if value]
    if given:
        raise ValueError(
            f"data.{generated}.num_train={section.num_train} trains on a generated dataset, but "
            f"{', '.join('data.' + f for f in given)} name your own files too: set "
            f"--config.data.{generated}.num_train=0 to use your files (and data.name to a name of their own), "
            "or leave the paths unset for the generated data")
    if not section.dir:
        raise ValueError(f"data.{generated}.num_train > 0 needs data.{generated}.dir, where the data are written")
    sources.update(GENERATORS[generated][1](section.dir))
    return sources


def prepare_dataset(config: ml_collections.ConfigDict):
    """Generates the configured synthetic dataset and builds the TFDS dataset if it is not built yet (on process 0;
    the others wait). Returns (builder, sources)."""
    data = config.data
    sources = dataset_sources(data)
    if jax.process_index() == 0:
        generated = generated_section(data)
        if generated is not None:
            section = data[generated]
            GENERATORS[generated][0](section.dir, section.num_train, section.num_val, section.seed)
        coco_dataset.build(sources)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dataset built")
    return coco_dataset.get_builder(sources), sources
