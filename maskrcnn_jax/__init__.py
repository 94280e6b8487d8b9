"""Mask R-CNN in JAX/Flax."""
