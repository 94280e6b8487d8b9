import numpy as np
import pytest

from maskrcnn_jax import ops
from maskrcnn_jax.ops.anchors import feature_map_size


def test_anchor_counts_and_layout():
    levels = ops.generate_anchors((128, 192))
    for anchors, stride in zip(levels, (4, 8, 16, 32, 64)):
        h, w = feature_map_size((128, 192), stride)
        assert anchors.shape == (h * w * 3, 4)
    p2 = np.asarray(levels[0]).reshape(32, 48, 3, 4)
    centres = (p2[..., :2] + p2[..., 2:]) / 2
    # Location-major: anchors of one cell share a centre on the stride grid, x varying fastest.
    np.testing.assert_allclose(centres[2, 5, :, 0], 5 * 4)
    np.testing.assert_allclose(centres[2, 5, :, 1], 2 * 4)
    sizes = np.sqrt((p2[0, 0, :, 2] - p2[0, 0, :, 0]) * (p2[0, 0, :, 3] - p2[0, 0, :, 1]))
    np.testing.assert_allclose(sizes, 32, rtol=0.05)
    ratios = (p2[0, 0, :, 3] - p2[0, 0, :, 1]) / (p2[0, 0, :, 2] - p2[0, 0, :, 0])
    np.testing.assert_allclose(ratios, [0.5, 1.0, 2.0], rtol=0.06)


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
