"""Flax building blocks below the architecture: convolutions (with the CPU backward bound once), norms, pooling
and the mask head's transposed convolution. Backend-specific speed code lives here so that modeling/ reads as the
paper's architecture."""
