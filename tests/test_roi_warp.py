"""RoIWarp (avg, max) and RoIAlign max: a float64 NumPy reference (values and gradients), torchvision parity where it
has the op, finite differences, multi-level, jit and vmap.

torchvision has neither RoIWarp nor a max-mode RoIAlign. RoIWarp "avg" is torchvision's roi_align(aligned=True)
on boxes quantized the way roi_pool quantizes them, which pins the bilinear part to the peer; everything else is
pinned to the reference below, written from the definitions in roi_warp.py's docstring, not from the JAX code.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import (
    flatten_pyramid,
    fpn_level_for_boxes,
    multilevel_roi_align,
    multilevel_roi_warp,
    roi_align,
    roi_pool,
    roi_warp,
)
from torch_layout import torch_nchw, torch_rois

F32 = np.float32
# Reference in float64, op in float32: sample positions differ by float32 rounding.
RTOL, ATOL = 1e-5, 1e-5

roi_warp_jit = jax.jit(roi_warp, static_argnums=(2, 3, 4, 5))
roi_align_jit = jax.jit(roi_align, static_argnums=(2, 3, 4, 5, 6))
multilevel_roi_warp_jit = jax.jit(multilevel_roi_warp, static_argnums=(2, 3, 4, 5))
multilevel_roi_align_jit = jax.jit(multilevel_roi_align, static_argnums=(2, 3, 4, 5, 6))


# -- reference -------------------------------------------------------------------------------------------------


def c_round(value):
    """C's round() of a float32 product: halves away from zero (exact in float64)."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def axis_taps(u, size):
    """(cell, weight) pairs of a sample at index coordinate u (cell i's value at u = i), torchvision's border:
    nothing outside [-1, size], clamped onto the first / last cell inside it."""
    if u < -1.0 or u > size:
        return []
    u = max(u, 0.0)
    low = math.floor(u)
    if low >= size - 1:
        return [(size - 1, 1.0)]
    return [(low, 1.0 - (u - low)), (low + 1, u - low)]


def reference_bins(image, sample_position, output_size, grid, roi_reduce, cotangent, grad):
    """Pools one RoI of image [H, W, C] (float64). sample_position(ph, pw, iy, ix) -> index coordinates (u_y, u_x).

    Returns [oh, ow, C]; adds the VJP of `cotangent` [oh, ow, C] into `grad` [H, W, C].
    """
    height, width, channels = image.shape
    oh, ow = output_size
    out = np.zeros((oh, ow, channels))
    for ph in range(oh):
        for pw in range(ow):
            values, taps = [], []
            for iy in range(grid):
                for ix in range(grid):
                    u_y, u_x = sample_position(ph, pw, iy, ix)
                    sample_taps = [
                        (row, col, wy * wx) for row, wy in axis_taps(u_y, height) for col, wx in axis_taps(u_x, width)
                    ]
                    values.append(sum((w * image[r, c] for r, c, w in sample_taps), np.zeros(channels)))
                    taps.append(sample_taps)
            values = np.stack(values)  # [samples, C]
            if roi_reduce == "avg":
                out[ph, pw] = values.mean(axis=0)
                for sample_taps in taps:
                    for r, c, w in sample_taps:
                        grad[r, c] += cotangent[ph, pw] * w / len(taps)
            else:
                winner = values.argmax(axis=0)  # the first maximal sample of each channel
                out[ph, pw] = values[winner, np.arange(channels)]
                for channel, sample in enumerate(winner):
                    for r, c, w in taps[sample]:
                        grad[r, c, channel] += cotangent[ph, pw, channel] * w
    return out


def reference_roi_align(image, box, output_size, scale, grid, roi_reduce, cotangent, grad, aligned):
    """RoIAlign of one box: continuous corners box * scale, shifted by half a cell when aligned."""
    shift = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = [float(F32(v) * F32(scale)) - shift for v in box]
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    oh, ow = output_size

    def position(ph, pw, iy, ix):
        return y1 + (ph + (iy + 0.5) / grid) * roi_h / oh, x1 + (pw + (ix + 0.5) / grid) * roi_w / ow

    return reference_bins(image, position, output_size, grid, roi_reduce, cotangent, grad)


def quantize(box, scale):
    """RoIPool's cells: (x1q, y1q, w, h), the RoI covering cells x1q .. x1q + w - 1 (at least one)."""
    x1, y1, x2, y2 = [c_round(float(F32(v) * F32(scale))) for v in box]
    return x1, y1, max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)


def reference_roi_warp(image, box, output_size, scale, grid, roi_reduce, cotangent, grad):
    """RoIWarp of one box: the quantized RoI [x1q, x1q + w) in continuous coordinates (cell i covers [i, i + 1),
    its value at the centre i + 0.5), equal bins, samples at sub-bin centres."""
    x1, y1, w, h = quantize(box, scale)
    oh, ow = output_size

    def position(ph, pw, iy, ix):
        y = y1 + (ph + (iy + 0.5) / grid) * h / oh
        x = x1 + (pw + (ix + 0.5) / grid) * w / ow
        return y - 0.5, x - 0.5

    return reference_bins(image, position, output_size, grid, roi_reduce, cotangent, grad)


def reference(pool_one, features, boxes, output_size, scale, grid, roi_reduce, cotangent=None, **kwargs):
    """[B, H, W, C] features, [B, N, 4] boxes -> ([B, N, oh, ow, C] output, gradient of <output, cotangent>)."""
    batch, num = boxes.shape[:2]
    features = features.astype(np.float64)
    if cotangent is None:
        cotangent = np.zeros((batch, num, *output_size, features.shape[-1]))
    grad = np.zeros_like(features)
    out = np.stack([
        np.stack([
            pool_one(features[b], boxes[b, n], output_size, scale, grid, roi_reduce, cotangent[b, n], grad[b], **kwargs)
            for n in range(num)
        ])
        for b in range(batch)
    ])
    return out, grad


def reference_multilevel(pool_one, levels, boxes, output_size, strides, grid, roi_reduce, cotangent, **kwargs):
    """Each box on its FPN level (fpn_level_for_boxes, itself checked against torchvision's LevelMapper)."""
    min_level = int(round(math.log2(strides[0])))
    level = np.asarray(fpn_level_for_boxes(jnp.asarray(boxes), min_level, min_level + len(strides) - 1)) - min_level
    levels = [f.astype(np.float64) for f in levels]
    grads = [np.zeros_like(f) for f in levels]
    out = np.zeros((*boxes.shape[:2], *output_size, levels[0].shape[-1]))
    for b in range(boxes.shape[0]):
        for n in range(boxes.shape[1]):
            k = level[b, n]
            out[b, n] = pool_one(levels[k][b], boxes[b, n], output_size, 1.0 / strides[k], grid, roi_reduce,
                                 cotangent[b, n], grads[k][b], **kwargs)
    return out, grads, level


# -- inputs ----------------------------------------------------------------------------------------------------


def random_boxes(rng, batch, num, height, width, scale):
    """Boxes over a (height/scale, width/scale) image: tiny to larger than the image, partly or wholly outside,
    corners landing on .5 cells after scaling (RoIPool's rounding), and an inverted one."""
    image_h, image_w = height / scale, width / scale
    centre = rng.uniform(-0.2, 1.2, (batch, num, 2)) * [image_w, image_h]
    size = np.exp(rng.uniform(np.log(0.2), np.log(1.6 * max(image_h, image_w)), (batch, num, 2)))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=-1)
    half = 0.5 / scale
    boxes[:, 0] = [-7 * half, -3 * half, 0.6 * image_w, 0.5 * image_h]  # top-left outside; x1 on -3.5 cells
    boxes[:, 1] = [0.2 * image_w, 0.3 * image_h, 1.3 * image_w, 1.4 * image_h]  # bottom-right outside
    boxes[:, 2] = [0.4 * image_w, 0.4 * image_h, 0.4 * image_w + 0.3, 0.4 * image_h + 0.2]  # sub-cell
    boxes[:, 3] = [3 * half, 5 * half, 9 * half, 1 * half]  # y2 < y1: forced to one cell
    boxes[:, 4] = [-20 * half, -30 * half, -8 * half, -6 * half]  # outside: every sample reads 0
    return boxes.astype(F32)


def pyramid(rng, batch, image_hw, strides, channels):
    return [rng.standard_normal((batch, image_hw[0] // s, image_hw[1] // s, channels)).astype(F32) for s in strides]


def pyramid_boxes(rng, batch, num, image_hw):
    """Boxes from 8 to ~900 pixels so every FPN level is used, some crossing the image border."""
    centre = rng.uniform(-0.1, 1.1, (batch, num, 2)) * [image_hw[1], image_hw[0]]
    size = np.exp(rng.uniform(np.log(8), np.log(900), (batch, num, 1))) * np.exp(
        rng.uniform(-0.5, 0.5, (batch, num, 2))
    )
    return np.concatenate([centre - size / 2, centre + size / 2], axis=-1).astype(F32)


def vjp_jit(fn):
    """jit of (features, cotangent) -> (fn(features), its VJP)."""

    @jax.jit
    def values_and_grad(features, cotangent):
        out, vjp = jax.vjp(fn, features)
        return out, vjp(cotangent)[0]

    return values_and_grad


# -- single level ----------------------------------------------------------------------------------------------

# (op, roi_reduce, aligned): the three new poolings; RoIAlign avg is tests/test_roi_align.py's. Compiles dominate
# on a CPU, so each test takes the cases it needs.
ALIGN_MAX = ("align", "max", True)
LEGACY_ALIGN_MAX = ("align", "max", False)
WARP_AVG = ("warp", "avg", None)
WARP_MAX = ("warp", "max", None)


def op_and_reference(op, roi_reduce, aligned, output_size, scale, grid):
    if op == "align":
        fn = lambda f, b: roi_align(f, b, output_size, scale, grid, aligned, roi_reduce)  # noqa: E731
        ref = functools.partial(reference_roi_align, aligned=aligned)
    else:
        fn = lambda f, b: roi_warp(f, b, output_size, scale, grid, roi_reduce)  # noqa: E731
        ref = reference_roi_warp
    return fn, ref


@pytest.mark.parametrize(
    "op,roi_reduce,aligned,sampling_ratio",
    [(*LEGACY_ALIGN_MAX, 1), (*ALIGN_MAX, 2), (*WARP_AVG, 1), (*WARP_AVG, 2), (*WARP_MAX, 2), (*WARP_MAX, 3)],
)
def test_values_and_gradient_match_numpy_reference(rng, op, roi_reduce, aligned, sampling_ratio):
    features = rng.standard_normal((2, 9, 12, 3)).astype(F32)
    boxes = random_boxes(rng, 2, 12, 9, 12, 0.25)
    cotangent = rng.standard_normal((2, 12, 4, 3, 3)).astype(F32)
    fn, ref = op_and_reference(op, roi_reduce, aligned, (4, 3), 0.25, sampling_ratio)

    got, got_grad = vjp_jit(lambda f: fn(f, jnp.asarray(boxes)))(jnp.asarray(features), jnp.asarray(cotangent))
    want, want_grad = reference(ref, features, boxes, (4, 3), 0.25, sampling_ratio, roi_reduce, cotangent)
    assert got.shape == (2, 12, 4, 3, 3)
    assert np.abs(want).max() > 0.5 and np.abs(want_grad).max() > 0.5
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(got_grad), want_grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("sampling_ratio", [1, 2, 4])
def test_warp_avg_is_torchvision_roi_align_on_quantized_boxes(rng, sampling_ratio):
    """RoIWarp avg == torchvision.ops.roi_align(aligned=True, spatial_scale=1) on RoIPool's cells (x1q, x1q + w)."""
    torchvision = pytest.importorskip("torchvision")
    features = rng.standard_normal((2, 13, 17, 8)).astype(F32)
    boxes = random_boxes(rng, 2, 24, 13, 17, 0.125)
    got = roi_warp_jit(jnp.asarray(features), jnp.asarray(boxes), (5, 3), 0.125, sampling_ratio, "avg")

    cells = np.array([[quantize(box, 0.125) for box in image_boxes] for image_boxes in boxes], F32)
    x1, y1, w, h = np.moveaxis(cells, -1, 0)
    quantized = np.stack([x1, y1, x1 + w, y1 + h], axis=-1)
    want = torchvision.ops.roi_align(torch_nchw(features), torch_rois(quantized), (5, 3), 1.0, sampling_ratio, True)
    want = want.numpy().transpose(0, 2, 3, 1).reshape(2, 24, 5, 3, 8)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("roi_reduce", ["avg", "max"])
def test_one_sample_per_cell_reads_roi_pools_cells(rng, roi_reduce):
    """Boxes that quantize to exactly (oh, ow) cells, one sample per bin: every bin reads its cell's value
    unblended, which is also what RoIPool returns (one cell per bin)."""
    features = rng.standard_normal((2, 10, 13, 4)).astype(F32)
    oh, ow = 4, 6
    corner = rng.integers(0, [13 - ow + 1, 10 - oh + 1], (2, 9, 2)).astype(F32)
    jitter = rng.uniform(-0.45, 0.45, (2, 9, 4))
    boxes = (np.concatenate([corner, corner + [ow - 1, oh - 1]], axis=-1) + jitter) * 2.0  # stride 2
    boxes = jnp.asarray(boxes.astype(F32))
    got = roi_warp_jit(jnp.asarray(features), boxes, (oh, ow), 0.5, 1, roi_reduce)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(roi_pool(jnp.asarray(features), boxes, (oh, ow), 0.5)))
    x, y = corner[1, 2].astype(int)
    np.testing.assert_array_equal(np.asarray(got[1, 2]), features[1, y : y + oh, x : x + ow])


@pytest.mark.parametrize("op,roi_reduce,aligned", [ALIGN_MAX, WARP_MAX])
def test_each_bin_sends_its_cotangent_once(rng, op, roi_reduce, aligned):
    """Every sample within a cell of the map has bilinear weights summing to 1, so the feature gradient sums to
    the cotangent's sum. Boxes hugging the border put several samples of a bin on the same clamped cell: exact
    ties between samples with the same neighbours, which must still send the bin's cotangent once (an argmax that
    XLA recomputed inside each backward scatter once broke such ties differently per copy and sent it twice)."""
    features = rng.standard_normal((2, 9, 12, 3)).astype(F32)
    low = rng.uniform(-0.5, 0.3, (2, 12, 2))
    extent = np.exp(rng.uniform(np.log(0.3), np.log(12.0), (2, 12, 2)))
    high = np.minimum(low + extent, [11.4, 8.4])  # RoIWarp's last cell rounds to the map's last
    boxes = (np.concatenate([low, high], axis=-1) * 4.0).astype(F32)  # feature cells -> input pixels
    cotangent = rng.standard_normal((2, 12, 4, 3, 3)).astype(F32)
    fn, _ = op_and_reference(op, roi_reduce, aligned, (4, 3), 0.25, 2)
    _, grad = vjp_jit(lambda f: fn(f, jnp.asarray(boxes)))(jnp.asarray(features), jnp.asarray(cotangent))
    np.testing.assert_allclose(np.asarray(grad).sum(axis=(1, 2)), cotangent.sum(axis=(1, 2, 3)), rtol=1e-5, atol=1e-5)


def test_max_ties_send_the_gradient_to_the_first_maximal_sample(rng):
    """Integer features and samples exactly on cell centres (2 x 2 cells per bin, 2 x 2 samples): the 4 samples
    of a bin often tie, and the whole cotangent goes to the first one in row-major sample order."""
    features = rng.integers(-1, 2, (1, 12, 14, 5)).astype(F32)
    corner = rng.integers(0, [14 - 6 + 1, 12 - 4 + 1], (1, 10, 2)).astype(F32)
    boxes = np.concatenate([corner, corner + [5, 3]], axis=-1).astype(F32)  # 6 x 4 cells -> 3 x 2 bins
    cotangent = rng.standard_normal((1, 10, 2, 3, 5)).astype(F32)
    got, got_grad = vjp_jit(lambda f: roi_warp(f, jnp.asarray(boxes), (2, 3), 1.0, 2, "max"))(
        jnp.asarray(features), jnp.asarray(cotangent)
    )
    want, want_grad = reference(reference_roi_warp, features, boxes, (2, 3), 1.0, 2, "max", cotangent)
    samples = np.asarray(roi_warp_jit(jnp.asarray(features), jnp.asarray(boxes), (4, 6), 1.0, 1, "max"))
    bins = samples.reshape(1, 10, 2, 2, 3, 2, 5).transpose(0, 1, 2, 4, 6, 3, 5).reshape(1, 10, 2, 3, 5, 4)
    assert (np.sort(bins, axis=-1)[..., -1] == np.sort(bins, axis=-1)[..., -2]).mean() > 0.3, "ties should be common"
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_allclose(np.asarray(got_grad), want_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op,roi_reduce,aligned", [ALIGN_MAX, WARP_AVG, WARP_MAX])
def test_gradient_matches_central_differences_in_float64(rng, op, roi_reduce, aligned):
    """d<out, cotangent>/d features entry by entry. The output is linear in the features between argmax switches,
    and random features keep every bin away from a switch, so differences agree to float64 rounding."""
    features = rng.standard_normal((2, 6, 7, 2))
    boxes = random_boxes(rng, 2, 8, 6, 7, 0.5)
    cotangent = rng.standard_normal((2, 8, 3, 2, 2))
    fn, _ = op_and_reference(op, roi_reduce, aligned, (3, 2), 0.5, 2)
    eps = 1e-6
    with jax.enable_x64(True):

        def loss(f):
            return jnp.sum(fn(f, jnp.asarray(boxes)) * cotangent)

        grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(features)))
        steps = eps * np.eye(features.size).reshape(-1, *features.shape)
        losses = jax.jit(jax.vmap(loss))(jnp.asarray(np.concatenate([features + steps, features - steps])))
        plus, minus = np.asarray(losses).reshape(2, *features.shape)
        numeric = (plus - minus) / (2 * eps)
        assert grad.dtype == np.float64
    assert np.abs(grad).max() > 0.5
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


def test_bad_roi_reduce_and_avg_default(rng):
    features = jnp.asarray(rng.standard_normal((1, 6, 6, 2)).astype(F32))
    boxes = jnp.asarray(random_boxes(rng, 1, 6, 6, 6, 1.0))
    for fn in (
        lambda r: roi_align(features, boxes, 2, 1.0, 2, True, r),
        lambda r: roi_warp(features, boxes, 2, 1.0, 2, r),
        lambda r: multilevel_roi_align([features], boxes, 2, (1,), 2, True, r),
        lambda r: multilevel_roi_warp([features], boxes, 2, (1,), 2, r),
    ):
        with pytest.raises(ValueError, match="roi_reduce"):
            fn("mean")
    default_align = jax.jit(lambda f, b: roi_align(f, b, 2, 1.0, 2, True))
    explicit_avg = roi_align_jit(features, boxes, 2, 1.0, 2, True, "avg")
    np.testing.assert_array_equal(default_align(features, boxes), explicit_avg)
    warp_avg = roi_warp_jit(features, boxes, 2, 1.0, 1, "avg")
    np.testing.assert_array_equal(jax.jit(lambda f, b: roi_warp(f, b, 2, 1.0, 1))(features, boxes), warp_avg)
    # One sample per bin: max and avg coincide (up to avg's multiply-add contraction).
    np.testing.assert_allclose(roi_warp_jit(features, boxes, 2, 1.0, 1, "max"), warp_avg, rtol=1e-6, atol=1e-7)


# -- multi-level -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,roi_reduce,aligned", [LEGACY_ALIGN_MAX, WARP_AVG, WARP_MAX])
def test_multilevel_matches_numpy_reference_on_each_boxs_level(rng, op, roi_reduce, aligned):
    image_hw, strides = (64, 96), (8, 16, 32)
    levels = pyramid(rng, 2, image_hw, strides, 3)
    boxes = pyramid_boxes(rng, 2, 20, image_hw)
    cotangent = rng.standard_normal((2, 20, 3, 2, 3)).astype(F32)
    if op == "align":
        pool = functools.partial(multilevel_roi_align, aligned=aligned)
        ref = functools.partial(reference_roi_align, aligned=aligned)
    else:
        pool, ref = multilevel_roi_warp, reference_roi_warp

    def fn(fs):
        return pool(fs, jnp.asarray(boxes), (3, 2), strides, 2, roi_reduce=roi_reduce)

    got, got_grads = vjp_jit(fn)([jnp.asarray(f) for f in levels], jnp.asarray(cotangent))
    want, want_grads, level = reference_multilevel(ref, levels, boxes, (3, 2), strides, 2, roi_reduce, cotangent)
    assert set(level.ravel().tolist()) == {0, 1, 2}, "every level should get some boxes"
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert np.abs(want_grad).max() > 0.1
        np.testing.assert_allclose(np.asarray(got_grad), want_grad, rtol=RTOL, atol=ATOL)
    # A shared FlatPyramid pools the same numbers as the level list.
    np.testing.assert_array_equal(np.asarray(jax.jit(fn)(flatten_pyramid([jnp.asarray(f) for f in levels], strides))),
                                  np.asarray(got))


@pytest.mark.parametrize("roi_reduce", ["avg", "max"])
def test_multilevel_warp_single_level_equals_roi_warp(rng, roi_reduce):
    features = jnp.asarray(rng.standard_normal((2, 8, 12, 4)).astype(F32))
    boxes = jnp.asarray(pyramid_boxes(rng, 2, 9, (64, 96)))
    got = multilevel_roi_warp_jit([features], boxes, 3, (8,), 2, roi_reduce)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(roi_warp_jit(features, boxes, 3, 1.0 / 8, 2, roi_reduce)))


# -- jit and vmap ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,roi_reduce,aligned", [ALIGN_MAX, WARP_MAX])
def test_jit_equals_eager(rng, op, roi_reduce, aligned):
    features = jnp.asarray(rng.standard_normal((2, 7, 9, 3)).astype(F32))
    boxes = jnp.asarray(random_boxes(rng, 2, 7, 7, 9, 0.5))
    fn, _ = op_and_reference(op, roi_reduce, aligned, (2, 3), 0.5, 2)
    # Eager against jit: the same sums up to float32 contraction (FMA) rounding.
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(features, boxes)), np.asarray(fn(features, boxes)), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("op,roi_reduce,aligned", [ALIGN_MAX, WARP_MAX])
def test_batch_equals_per_image_calls_and_outer_vmap(rng, op, roi_reduce, aligned):
    features = jnp.asarray(rng.standard_normal((3, 8, 9, 5)).astype(F32))
    boxes = jnp.asarray(random_boxes(rng, 3, 7, 8, 9, 0.5))
    fn, _ = op_and_reference(op, roi_reduce, aligned, (2, 3), 0.5, 2)
    batched = jax.jit(fn)(features, boxes)
    for b in range(3):
        single = jax.jit(fn)(features[b : b + 1], boxes[b : b + 1])
        np.testing.assert_allclose(np.asarray(batched[b]), np.asarray(single[0]), rtol=1e-6, atol=1e-6)
    # An outer vmap (e.g. over per-device batches) adds a leading axis; its gradient too.
    stacked = jax.jit(jax.vmap(fn))(features[:, None], boxes[:, None])
    np.testing.assert_allclose(np.asarray(stacked[:, 0]), np.asarray(batched), rtol=1e-6, atol=1e-6)
    grad = jax.jit(jax.grad(lambda f: jnp.sum(fn(f, boxes) ** 2)))(features)
    vmapped_grad = jax.jit(jax.vmap(jax.grad(lambda f, b: jnp.sum(fn(f, b) ** 2))))(features[:, None], boxes[:, None])
    np.testing.assert_allclose(np.asarray(vmapped_grad[:, 0]), np.asarray(grad), rtol=1e-5, atol=1e-6)
