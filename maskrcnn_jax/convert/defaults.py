"""The config file that describes each library's model, for when the command line is given none."""

import importlib.util
import pathlib

import ml_collections

DEFAULT_CONFIGS = {
    "torchvision": "torchvision_maskrcnn_r50_fpn.py",
    "detectron2": "detectron2_maskrcnn_r50_fpn.py",
}
CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"


def default_config(source: str) -> ml_collections.ConfigDict:
    """get_config() of configs/torchvision_maskrcnn_r50_fpn.py or configs/detectron2_maskrcnn_r50_fpn.py."""
    path = CONFIGS_DIR / DEFAULT_CONFIGS[source]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
