"""`Predictor`, kept importable from here: it lives in maskrcnn_jax.serving.predictor."""

from maskrcnn_jax.serving.predictor import Predictor

__all__ = ["Predictor"]
