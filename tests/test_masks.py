import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops.masks import (
    crop_masks_to_boxes,
    mask_targets_from_cropped,
    paste_mask_probabilities,
    paste_masks,
)


def _random_boxes(rng, n, height, width, min_size=2.0):
    x1 = rng.uniform(-0.1 * width, 0.9 * width, n)
    y1 = rng.uniform(-0.1 * height, 0.9 * height, n)
    w = rng.uniform(min_size, 0.6 * width, n)
    h = rng.uniform(min_size, 0.6 * height, n)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def _ellipse_masks(rng, count, height, width):
    """Rotated filled ellipses (polygon-like GT masks) and their tight boxes."""
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    masks, boxes = [], []
    for _ in range(count):
        cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
        ry, rx = rng.uniform(4, 0.35 * height), rng.uniform(4, 0.35 * width)
        angle = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / rx
        v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / ry
        mask = u * u + v * v <= 1.0
        ys, xs = np.nonzero(mask)
        masks.append(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.stack(masks), np.asarray(boxes, np.float32)


def _bilinear_zero_padded(grid, sy, sx):
    """NumPy bilinear read of grid[m, m] at index coordinates (sy, sx) arrays; missing neighbours count as 0."""
    m_y, m_x = grid.shape
    y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
    fy, fx = sy - y0, sx - x0
    out = np.zeros(np.broadcast(sy, sx).shape, np.float64)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yi, xi = y0 + dy, x0 + dx
            ok = (yi >= 0) & (yi < m_y) & (xi >= 0) & (xi < m_x)
            out += np.where(ok, wy * wx * grid[np.clip(yi, 0, m_y - 1), np.clip(xi, 0, m_x - 1)], 0.0)
    return out


def _numpy_paste(masks, boxes, height, width):
    out = np.zeros((len(masks), height, width))
    for n, (mask, (x1, y1, x2, y2)) in enumerate(zip(masks, boxes)):
        m = mask.shape[-1]
        sy = (np.arange(height) + 0.5 - y1) / (y2 - y1) * m - 0.5
        sx = (np.arange(width) + 0.5 - x1) / (x2 - x1) * m - 0.5
        out[n] = _bilinear_zero_padded(mask.astype(np.float64), sy[:, None], sx[None, :])
    return out


def _detectron2_paste_torch(torch, masks, boxes, height, width):
    """detectron2's _do_paste_mask (whole-image GPU path) written with torch grid_sample.

    torchvision.ops.paste_masks_in_image is deliberately not the reference: it rounds boxes to integers and pads
    the mask by a cell, so it disagrees with continuous-box pasting by up to a pixel.
    """
    masks = torch.tensor(masks)[:, None]
    boxes = torch.tensor(boxes)
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
    img_y = torch.arange(height, dtype=torch.float32) + 0.5
    img_x = torch.arange(width, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    gx = img_x[:, None, :].expand(len(masks), height, width)
    gy = img_y[:, :, None].expand(len(masks), height, width)
    grid = torch.stack([gx, gy], dim=3)
    return torch.nn.functional.grid_sample(masks, grid, align_corners=False)[:, 0].numpy()


def test_paste_probabilities_match_numpy_reference(rng):
    masks = rng.uniform(0, 1, (6, 14, 14)).astype(np.float32)
    boxes = _random_boxes(rng, 6, 40, 56)
    got = np.asarray(paste_mask_probabilities(masks, boxes, (40, 56)))
    np.testing.assert_allclose(got, _numpy_paste(masks, boxes, 40, 56), rtol=1e-5, atol=1e-6)


def test_paste_probabilities_match_detectron2_grid_sample(rng):
    torch = pytest.importorskip("torch")
    masks = rng.uniform(0, 1, (8, 28, 28)).astype(np.float32)
    boxes = _random_boxes(rng, 8, 70, 90)
    got = np.asarray(paste_mask_probabilities(masks, boxes, (70, 90)))
    want = _detectron2_paste_torch(torch, masks, boxes, 70, 90)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_paste_masks_thresholds_like_detectron2(rng):
    torch = pytest.importorskip("torch")
    masks = rng.uniform(0, 1, (5, 28, 28)).astype(np.float32)
    boxes = _random_boxes(rng, 5, 64, 80)
    got = np.asarray(jax.jit(paste_masks, static_argnums=2)(masks, boxes, (64, 80)))
    probabilities = _detectron2_paste_torch(torch, masks, boxes, 64, 80)
    assert got.dtype == np.bool_ and got.shape == (5, 64, 80)
    decided = np.abs(probabilities - 0.5) > 1e-5  # float rounding can flip pixels that sit exactly at 0.5
    np.testing.assert_array_equal(got[decided], probabilities[decided] >= 0.5)
    assert got.any()


def test_paste_full_mask_fills_the_box_and_nothing_outside():
    box = np.array([[10.3, 5.7, 30.9, 25.2]], np.float32)
    pasted = np.asarray(paste_masks(np.ones((1, 28, 28), np.float32), box, (40, 48)))[0]
    centres_y = np.arange(40)[:, None] + 0.5
    centres_x = np.arange(48)[None, :] + 0.5
    half_cell_y = (box[0, 3] - box[0, 1]) / 28 / 2
    half_cell_x = (box[0, 2] - box[0, 0]) / 28 / 2
    deep_inside = ((centres_y >= box[0, 1] + half_cell_y) & (centres_y <= box[0, 3] - half_cell_y)
                   & (centres_x >= box[0, 0] + half_cell_x) & (centres_x <= box[0, 2] - half_cell_x))
    outside = ((centres_y < box[0, 1]) | (centres_y > box[0, 3]) | (centres_x < box[0, 0]) | (centres_x > box[0, 2]))
    assert pasted[deep_inside].all()
    assert not pasted[outside].any()


def test_paste_degenerate_box_pastes_nothing(rng):
    masks = rng.uniform(0.6, 1, (2, 28, 28)).astype(np.float32)
    boxes = np.array([[5.5, 5.5, 5.5, 20.0], [0, 0, 0, 0]], np.float32)
    pasted = paste_masks(masks, boxes, (32, 32))
    assert not np.asarray(pasted).any()
    assert np.isfinite(np.asarray(paste_mask_probabilities(masks, boxes, (32, 32)))).all()


def test_paste_masks_vmap_over_batch(rng):
    masks = rng.uniform(0, 1, (2, 3, 14, 14)).astype(np.float32)
    boxes = np.stack([_random_boxes(rng, 3, 24, 30) for _ in range(2)])
    batched = jax.jit(jax.vmap(lambda m, b: paste_masks(m, b, (24, 30), chunk_size=2)))(masks, boxes)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(paste_masks(masks[i], boxes[i], (24, 30))))


@pytest.mark.parametrize("sampling_ratio", [1, 2, 4])
def test_crop_masks_match_torchvision_roi_align(rng, sampling_ratio):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    full = rng.uniform(0, 1, (5, 30, 40)).astype(np.float32)
    boxes = _random_boxes(rng, 5, 30, 40)  # some reach past the image border
    got = np.asarray(crop_masks_to_boxes(full, boxes, 16, sampling_ratio))
    rois = torch.tensor(np.concatenate([np.arange(5, dtype=np.float32)[:, None], boxes], axis=1))
    want = torchvision.ops.roi_align(torch.tensor(full)[:, None], rois, 16, 1.0, sampling_ratio, True)[:, 0].numpy()
    # Sample positions are float32 image coordinates; at tens of pixels their last bit is ~4e-6 px, and the two
    # implementations round them differently (FMA), so fractional weights differ by a few 1e-6.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_crop_of_binary_mask_accepts_bool_input(rng):
    full, boxes = _ellipse_masks(rng, 3, 40, 50)
    from_bool = crop_masks_to_boxes(full, boxes, 24)
    from_float = crop_masks_to_boxes(full.astype(np.float32), boxes, 24)
    np.testing.assert_array_equal(np.asarray(from_bool), np.asarray(from_float))
    assert 0.0 <= float(from_bool.min()) and float(from_bool.max()) <= 1.0


def _numpy_mask_targets(crops, gt_boxes, rois, matched, size, sampling_ratio):
    out = np.zeros((len(rois), size, size))
    crop_size = crops.shape[-1]
    offsets = (np.arange(sampling_ratio) + 0.5) / sampling_ratio
    for r, (x1, y1, x2, y2) in enumerate(rois.astype(np.float64)):
        gx1, gy1, gx2, gy2 = gt_boxes[matched[r]].astype(np.float64)
        py = y1 + (np.arange(size)[:, None] + offsets).reshape(-1) * (y2 - y1) / size
        px = x1 + (np.arange(size)[:, None] + offsets).reshape(-1) * (x2 - x1) / size
        sy = (py - gy1) / (gy2 - gy1) * crop_size - 0.5
        sx = (px - gx1) / (gx2 - gx1) * crop_size - 0.5
        samples = _bilinear_zero_padded(crops[matched[r]].astype(np.float64), sy[:, None], sx[None, :])
        out[r] = samples.reshape(size, sampling_ratio, size, sampling_ratio).mean(axis=(1, 3))
    return out


def test_mask_targets_match_numpy_reference(rng):
    crops = rng.uniform(0, 1, (4, 20, 20)).astype(np.float32)
    gt_boxes = _random_boxes(rng, 4, 50, 60, min_size=5.0)
    matched = rng.integers(0, 4, 9)
    rois = gt_boxes[matched] + rng.normal(0, 4, (9, 4)).astype(np.float32)
    rois[:, 2:] = np.maximum(rois[:, 2:], rois[:, :2] + 1.0)
    soft = mask_targets_from_cropped(crops, gt_boxes, rois, matched, 7, sampling_ratio=2, threshold=None)
    want = _numpy_mask_targets(crops, gt_boxes, rois, matched, 7, 2)
    np.testing.assert_allclose(np.asarray(soft), want, rtol=1e-5, atol=1e-5)
    binary = mask_targets_from_cropped(crops, gt_boxes, rois, matched, 7, sampling_ratio=2)
    decided = np.abs(want - 0.5) > 1e-4
    np.testing.assert_array_equal(np.asarray(binary)[decided], (want >= 0.5)[decided].astype(np.float32))


def test_mask_target_of_the_gt_box_itself_is_the_crop(rng):
    crops = rng.uniform(0, 1, (3, 16, 16)).astype(np.float32)
    gt_boxes = _random_boxes(rng, 3, 50, 60, min_size=5.0)
    soft = mask_targets_from_cropped(crops, gt_boxes, gt_boxes, np.arange(3), 16, sampling_ratio=1, threshold=None)
    np.testing.assert_allclose(np.asarray(soft), crops, atol=1e-4)


def test_mask_target_is_zero_away_from_the_gt_box(rng):
    crops = rng.uniform(0.5, 1, (1, 16, 16)).astype(np.float32)
    gt_boxes = np.array([[10, 10, 30, 30]], np.float32)
    rois = np.array([[40, 5, 60, 25], [0, 0, 10, 10]], np.float32)  # disjoint / touching at a corner
    soft = mask_targets_from_cropped(crops, gt_boxes, rois, np.zeros(2, np.int32), 14, threshold=None)
    assert float(np.asarray(soft)[0].max()) == 0.0
    assert np.asarray(mask_targets_from_cropped(crops, gt_boxes, rois, np.zeros(2, np.int32), 14)).max() == 0.0


def test_mask_targets_agree_with_roi_align_of_full_masks(rng):
    """Box-cropped GT at M=112 vs detectron2's target roi_align(full mask, roi, 28, sampling_ratio=0, aligned=True).

    On rotated ellipses in a 240x320 image (objects up to ~220 px, so crops are both up- and down-sampled) and RoIs
    jittered around their GT boxes (positive-like, 10% of box size per coordinate), over 8 seeds the soft targets
    differed by 0.0022-0.0030 on average and 0.18-0.31% of binarised target pixels disagreed (all on the mask
    boundary). Asserted: mean absolute difference < 0.004 and disagreement < 0.4% of pixels. Reading the crop half a
    cell off (a wrong pixel-centre convention) gives 0.0067-0.0098 and 0.54-0.91%, so both bounds catch it.
    """
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    full, gt_boxes = _ellipse_masks(rng, 12, 240, 320)
    num_rois = 96
    matched = rng.integers(0, 12, num_rois)
    sizes = np.tile(gt_boxes[matched, 2:] - gt_boxes[matched, :2], 2)
    rois = gt_boxes[matched] + (rng.normal(0, 0.1, (num_rois, 4)) * sizes).astype(np.float32)
    rois[:, 2:] = np.maximum(rois[:, 2:], rois[:, :2] + 2.0)

    crops = crop_masks_to_boxes(full, gt_boxes, 112)
    targets = jax.jit(mask_targets_from_cropped, static_argnames=("output_size", "threshold"))
    soft = np.asarray(targets(crops, gt_boxes, rois, matched, output_size=28, threshold=None))
    binary = np.asarray(targets(crops, gt_boxes, rois, matched, output_size=28))

    indexed_rois = torch.tensor(np.concatenate([matched[:, None].astype(np.float32), rois], axis=1))
    reference = torchvision.ops.roi_align(torch.tensor(full, dtype=torch.float32)[:, None], indexed_rois, 28,
                                          1.0, 0, True)[:, 0].numpy()
    mean_abs_diff = np.abs(soft - reference).mean()
    disagreement = (binary != (reference >= 0.5)).mean()
    assert mean_abs_diff < 0.004, mean_abs_diff
    assert disagreement < 0.004, disagreement
    assert binary.mean() > 0.2  # the RoIs really cover mask pixels


def test_mask_targets_jit_and_vmap(rng):
    crops = rng.uniform(0, 1, (2, 3, 12, 12)).astype(np.float32)
    gt_boxes = np.stack([_random_boxes(rng, 3, 40, 40, min_size=4.0) for _ in range(2)])
    rois = np.stack([_random_boxes(rng, 5, 40, 40, min_size=4.0) for _ in range(2)])
    matched = rng.integers(0, 3, (2, 5)).astype(np.int32)
    batched = jax.jit(jax.vmap(lambda c, g, r, m: mask_targets_from_cropped(c, g, r, m, 7, threshold=None)))(
        crops, gt_boxes, rois, matched)
    for i in range(2):
        single = mask_targets_from_cropped(crops[i], gt_boxes[i], rois[i], matched[i], 7, threshold=None)
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single), rtol=1e-5, atol=1e-6)
    assert batched.shape == (2, 5, 7, 7) and batched.dtype == jnp.float32
