"""Converting our NHWC features and [B, N, 4] boxes into the layouts torchvision's RoI ops take."""

import numpy as np
import pytest


def torch_rois(boxes):
    """[B, N, 4] -> torchvision's [B*N, 5] (batch index, x1, y1, x2, y2)."""
    torch = pytest.importorskip("torch")
    batch, num = boxes.shape[:2]
    index = np.repeat(np.arange(batch, dtype=np.float32), num)[:, None]
    return torch.from_numpy(np.concatenate([index, boxes.reshape(-1, 4)], axis=1))


def torch_nchw(features):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.ascontiguousarray(features.transpose(0, 3, 1, 2)))
