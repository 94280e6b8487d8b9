import numpy as np
import pytest

from maskrcnn_jax import ops
from maskrcnn_jax.ops.anchors import feature_map_size


def closed_form_anchors(image_size, stride, size, aspect_ratios):
    """torchvision's anchors in closed form: a cell's anchor of ratio r = h / w is centred on the cell's corner
    (j * stride, i * stride) and has half-extents round(size / sqrt(r) / 2) and round(size * sqrt(r) / 2)."""
    h, w = feature_map_size(image_size, stride)
    ratios = np.asarray(aspect_ratios, np.float64)
    half = np.stack([np.round(size / np.sqrt(ratios) / 2), np.round(size * np.sqrt(ratios) / 2)], axis=1)  # [A, 2]
    ys, xs = np.mgrid[0:h, 0:w] * stride
    centres = np.stack([xs, ys], axis=-1)[:, :, None, :]  # [h, w, 1, 2]
    return np.concatenate([centres - half, centres + half], axis=-1).reshape(-1, 4)


def test_anchor_counts_and_layout():
    levels = ops.generate_anchors((128, 192))
    for anchors, stride, size in zip(levels, (4, 8, 16, 32, 64), (32, 64, 128, 256, 512)):
        h, w = feature_map_size((128, 192), stride)
        assert anchors.shape == (h * w * 3, 4)
        np.testing.assert_array_equal(np.asarray(anchors), closed_form_anchors((128, 192), stride, size,
                                                                              (0.5, 1.0, 2.0)))
    p2 = np.asarray(levels[0]).reshape(32, 48, 3, 4)
    # Location-major: anchors of one cell share a centre on the stride grid, x varying fastest.
    np.testing.assert_array_equal((p2[2, 5, :, :2] + p2[2, 5, :, 2:]) / 2, [[20, 8]] * 3)
    # Size 32 at ratios h / w = 0.5, 1, 2: 45.25 x 22.6, 32 x 32, 22.6 x 45.25, each half-extent rounded.
    np.testing.assert_array_equal(p2[0, 0], [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]])


@pytest.mark.parametrize("image_size", [(800, 1344), (96, 160), (100, 130)])
def test_anchors_match_torchvision(image_size):
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    sizes = ((32,), (64,), (128,), (256,), (512,))
    generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    feature_maps = [torch.zeros(1, 1, *feature_map_size(image_size, s)) for s in (4, 8, 16, 32, 64)]
    images = ImageList(torch.zeros(1, 3, *image_size), [image_size])
    expected = generator(images, feature_maps)[0].numpy()
    ours = np.concatenate([np.asarray(a) for a in ops.generate_anchors(image_size)])
    np.testing.assert_array_equal(ours, expected)


def test_custom_sizes_and_ratios():
    levels = ops.generate_anchors((64, 64), strides=(8, 16), sizes=(16, 48), aspect_ratios=(1.0,))
    assert [a.shape for a in levels] == [(64, 4), (16, 4)]
    np.testing.assert_array_equal(np.asarray(levels[1][0]), [-24, -24, 24, 24])
    with pytest.raises(ValueError):
        ops.generate_anchors((64, 64), strides=(8, 16), sizes=(16,))
