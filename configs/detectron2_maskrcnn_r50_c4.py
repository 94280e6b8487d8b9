"""detectron2's Mask R-CNN R50-C4 with every setting its model uses.

The settings live in maskrcnn_jax/convert/configs/detectron2_maskrcnn_r50_c4.py, inside the package, because the
weight importer reads them when no --config is given (a detectron2 file with roi_heads.res5 is a C4 model).
"""

from maskrcnn_jax.convert.configs.detectron2_maskrcnn_r50_c4 import get_config

__all__ = ["get_config"]
