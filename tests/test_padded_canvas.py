"""The evaluation and inference canvas: data/image_resize.py's resized size and padded canvas against the peers' rules
(torchvision's GeneralizedRCNNTransform itself; detectron2's ResizeShortestEdge and ImageList padding, written out
from their definitions since detectron2 is not installed), the bucketing, and the imported-weights configs."""

import itertools

import pytest

from maskrcnn_jax.convert.configs import default_config
from maskrcnn_jax.data import image_resize
from maskrcnn_jax.data.options import InputOptions
from maskrcnn_jax.engine.workdir import numbered_categories
from maskrcnn_jax.serving.predictor import spec_from_config

# Image sizes (height, width): landscape, portrait, square, tiny, huge, extreme aspect ratios (the long-side limit),
# and sizes whose float32 scale puts a side just below a whole pixel (1802 x 1584: 799.99994 in float32, 800.0 in
# the peers' float64).
SIZES = [(480, 640), (640, 480), (427, 640), (512, 512), (600, 512), (512, 616), (300, 451), (400, 600), (37, 53),
         (3000, 4000), (4000, 3000), (200, 2000), (2000, 150), (1802, 1584), (1839, 1213), (1213, 1839), (1, 1),
         (799, 1333), (800, 1216), (333, 500), (500, 333), (375, 500), (612, 612), (428, 640),
         # Where detectron2's steps (long side to 1333, then the short one scaled) and a single scale round apart.
         (11, 22), (22, 11), (3, 62), (11, 682), (2666, 7)]
SIZES += [(h, w) for h, w in itertools.product(range(97, 2100, 181), range(89, 2100, 167))]


def spec(source):
    config = default_config(source)
    return spec_from_config(config, numbered_categories(config.model.num_classes - 1), 1)


def detectron2_resized(height, width, short=800, longest=1333):
    """detectron2's ResizeShortestEdge.get_output_shape at test time: the short side becomes `short`, the long side
    scales with it; if it then exceeds `longest` both scale down to fit; each side is rounded half up."""
    scale = short * 1.0 / min(height, width)
    if height < width:
        new_height, new_width = short * 1.0, scale * width
    else:
        new_height, new_width = scale * height, short * 1.0
    if max(new_height, new_width) > longest:
        scale = longest * 1.0 / max(new_height, new_width)
        new_height, new_width = new_height * scale, new_width * scale
    return int(new_height + 0.5), int(new_width + 0.5)


def detectron2_padded(size, divisibility=32):
    """ImageList.from_tensors(size_divisibility=32) on a batch of one: each side rounded up to a multiple."""
    return tuple((side + divisibility - 1) // divisibility * divisibility for side in size)


def test_padded_side_rules():
    assert image_resize.padded_canvas((937, 800), 32) == (960, 800)
    assert image_resize.padded_canvas((1, 33), 32) == (32, 64)
    # A coarser step: sides become multiples of it.
    assert image_resize.padded_canvas((800, 1199), 32, step=128) == (896, 1280)
    # A list of sides: the smallest that holds the padded side; beyond the largest, the step (else the divisor).
    assert image_resize.padded_canvas((800, 1199), 32, sides=(800, 1088, 1344)) == (800, 1344)
    assert image_resize.padded_canvas((600, 1400), 32, sides=(800, 1344)) == (800, 1408)
    assert image_resize.padded_canvas((600, 1400), 32, step=256, sides=(800, 1344)) == (800, 1536)
    for bad in [dict(size_divisibility=0), dict(size_divisibility=32, step=48),
                dict(size_divisibility=32, sides=(64, 48)), dict(size_divisibility=32, sides=(800, 1000))]:
        with pytest.raises(ValueError):
            image_resize.check_padding(**bad)
    with pytest.raises(ValueError, match="eval_canvas"):
        InputOptions(eval_canvas="dynamic")
    with pytest.raises(ValueError, match="eval_canvas_sides"):
        InputOptions(eval_canvas="padded", eval_canvas_sides=(100,))


def test_imported_weights_configs_use_padded_canvases():
    for source in ("torchvision", "detectron2"):
        config = default_config(source)
        assert config.data.eval_canvas == "padded" and config.data.size_divisibility == 32
        assert not config.data.eval_canvas_step and not config.data.eval_canvas_sides  # the peers' exact rule
        assert tuple(config.data.canvas_size) == (1344, 1344)  # training keeps its fixed canvas


def test_detectron2_config_gives_detectron2s_sizes_and_padded_canvases():
    inference = spec("detectron2")
    for height, width in SIZES:
        expected = detectron2_resized(height, width)
        resized = image_resize.resized_size(height, width, inference.canvas_size, inference.short_side,
                                            inference.long_side_max, inference.size_rounding)
        assert resized == expected, (height, width)
        canvas = inference.canvas_for(resized)
        assert canvas == detectron2_padded(expected), (height, width)
        assert canvas[0] % 32 == 0 and canvas[1] % 32 == 0
    # Hand-checked: 962.5 rounds up (half to even would give 962), and the long-side limit.
    assert detectron2_resized(512, 616) == (800, 963) and inference.canvas_for((800, 963)) == (800, 992)
    assert image_resize.resized_size(400, 1200, None, 800, 1333, "half_up") == (444, 1333)
    assert inference.canvas_for((444, 1333)) == (448, 1344)


def test_torchvision_config_gives_generalizedrcnntransforms_sizes_and_padded_canvases():
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    transform = GeneralizedRCNNTransform(800, 1333, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    inference = spec("torchvision")
    for height, width in SIZES:
        with torch.no_grad():
            images, _ = transform([torch.zeros(3, height, width)])
        resized = image_resize.resized_size(height, width, inference.canvas_size, inference.short_side,
                                            inference.long_side_max, inference.size_rounding)
        assert resized == tuple(images.image_sizes[0]), (height, width)
        assert inference.canvas_for(resized) == tuple(images.tensors.shape[-2:]), (height, width)
