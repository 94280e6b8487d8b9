"""Full-model parity: torchvision's maskrcnn_resnet50_fpn and ours with its converted weights, on real photographs.

The photograph is matplotlib's sample image grace_hopper.jpg (600 x 512, RGB), which ships in the matplotlib wheel
(a declared dependency). torchvision's model is built with `weights=None` from a fixed torch seed. Its BatchNorm
statistics and affine parameters are then drawn at random, and so are the biases of the FPN and heads (torchvision
initialises them to the identity and zeros, which would leave half of the conversion untested). The randomised
statistics also make the random classifier confident. Its top scores lie between 0.9 and 1, well above the 0.05
threshold, so the detection stage is exercised with the real thresholds on both sides, and no weight is rescaled.

Stage by stage, preprocessing is done once, by torchvision's own GeneralizedRCNNTransform: normalise, resize to
800 / 1333 (937 x 800 here), and pad to a multiple of 32 (960 x 800). Both models get that same tensor, so the
anchors agree exactly. One jitted function computes every stage on our side (XLA shares the backbone between them),
so there is one compile.

End to end, each side starts from the uint8 photographs (grace_hopper and four of scikit-image's, landscape,
portrait, small and larger than the training canvas): torchvision's model([photo]) against our Predictor from the
import CLI's checkpoint with configs/torchvision_maskrcnn_r50_fpn.py unchanged, whose padded canvases are
torchvision's padded batch of one image.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import ops
from maskrcnn_jax.convert import from_torchvision
from maskrcnn_jax.convert.configs import default_config
from maskrcnn_jax.inference import Predictor
from maskrcnn_jax.modeling.mask_rcnn import build_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchvision_reference import (  # noqa: E402
    TOP,
    compare_detections,
    grace_hopper,
    photographs,
    randomize_torchvision_model,
    torchvision_predictions,
)


def our_stages(module, images, image_sizes, torch_proposals, torch_boxes, torch_labels):
    """Every stage the test compares, from one trace: FPN levels, proposals, box-head logits on torchvision's own
    proposals and mask probabilities on torchvision's own detections (so those stages are checked on identical
    inputs), and the final predictions."""
    levels = module._features(images, False)
    _, _, proposals, proposal_valid = module._proposals(levels, images, image_sizes, False)
    pyramid = module._pooled_levels(levels)
    r = module.config.roi_heads
    class_logits, _ = module.box_head(module._pool(pyramid, torch_proposals, r.box_pool_size))
    mask_logits = module.mask_head(module._pool(pyramid, torch_boxes, r.mask_pool_size))
    masks = jax.nn.sigmoid(module._select_mask_channel(mask_logits, torch_labels))
    return levels, proposals, proposal_valid, class_logits, masks, module.predict(images, image_sizes)


@pytest.fixture(scope="module")
def reference():
    """torchvision's maskrcnn_resnet50_fpn with seeded random weights (see randomize_torchvision_model)."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    randomize_torchvision_model(torch, model)
    return torch, model


@pytest.fixture(scope="module")
def parity_run(reference):
    torch, reference = reference
    photo = grace_hopper()
    with torch.no_grad():
        image_list, _ = reference.transform([torch.from_numpy(photo).permute(2, 0, 1).float() / 255])
        features = reference.backbone(image_list.tensors)
        proposals, _ = reference.rpn(image_list, features)
        detections, _ = reference.roi_heads(features, proposals, image_list.image_sizes)
        pooled = reference.roi_heads.box_roi_pool(features, proposals, image_list.image_sizes)
        class_logits, _ = reference.roi_heads.box_predictor(reference.roi_heads.box_head(pooled))

    config = default_config("torchvision")
    model = build_model(config.model)
    variables = from_torchvision(reference.state_dict(), norm=config.model.backbone.norm)
    images = jnp.asarray(image_list.tensors.numpy().transpose(0, 2, 3, 1))
    image_sizes = jnp.asarray(image_list.image_sizes, jnp.int32)
    run = jax.jit(lambda v, *inputs: model.apply(v, *inputs, method=our_stages))
    torch_boxes = jnp.asarray(detections[0]["boxes"][:TOP].numpy())[None]
    torch_labels = jnp.asarray(detections[0]["labels"][:TOP].numpy(), jnp.int32)[None]
    levels, ours_proposals, ours_valid, ours_logits, ours_masks, predictions = jax.device_get(
        run(variables, images, image_sizes, jnp.asarray(proposals[0].numpy())[None], torch_boxes, torch_labels)
    )
    first = lambda x: np.asarray(x[0])
    return {
        "photo_size": photo.shape[:2],
        "input_size": tuple(image_list.image_sizes[0]),
        "torch_levels": [features[k][0].numpy().transpose(1, 2, 0) for k in ("0", "1", "2", "3", "pool")],
        "ours_levels": [first(level) for level in levels],
        "torch_proposals": proposals[0].numpy(),
        "ours_proposals": first(ours_proposals)[first(ours_valid)],
        "torch_logits": class_logits.numpy(),
        "ours_logits": first(ours_logits),
        "ours_masks_on_torch_boxes": first(ours_masks),
        "torch": {key: value.numpy() for key, value in detections[0].items()},
        "ours": {key: first(value) for key, value in predictions.items()},
    }


def test_fpn_features_match(parity_run):
    for level, (expected, actual) in enumerate(zip(parity_run["torch_levels"], parity_run["ours_levels"]), 2):
        assert expected.shape == actual.shape, f"P{level}"
        error = np.abs(expected - actual).max() / np.abs(expected).max()
        assert error < 1e-4, f"P{level}: relative error {error:.2e}"


def test_rpn_proposals_match(parity_run):
    expected, actual = parity_run["torch_proposals"], parity_run["ours_proposals"]
    assert len(expected) == len(actual) == 1000
    # The same boxes: each torchvision proposal has its own counterpart within 0.1 px (float32 rounding in box
    # decoding grows with the box: the largest errors are ~0.04 px on image-sized boxes).
    distance = np.abs(expected[:, None, :] - actual[None, :, :]).max(-1)
    nearest = distance.argmin(1)
    assert distance.min(1).max() < 0.1
    assert len(set(nearest.tolist())) == len(expected)
    # In the same order, up to swaps of neighbours whose scores tie within float32 rounding.
    assert np.abs(nearest - np.arange(len(expected))).max() <= 1
    assert (nearest == np.arange(len(expected))).mean() > 0.98


def test_box_head_logits_match(parity_run):
    expected, actual = parity_run["torch_logits"], parity_run["ours_logits"]
    assert expected.shape == actual.shape == (1000, 91)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_top_detections_match(parity_run):
    expected, actual = parity_run["torch"], parity_run["ours"]
    assert len(expected["scores"]) >= TOP and actual["valid"][:TOP].all()
    np.testing.assert_array_equal(actual["classes"][:TOP], expected["labels"][:TOP])
    np.testing.assert_allclose(actual["scores"][:TOP], expected["scores"][:TOP], atol=1e-3)
    np.testing.assert_allclose(actual["boxes"][:TOP], expected["boxes"][:TOP], atol=0.5)


def test_mask_head_matches_on_the_same_boxes(parity_run):
    """The mask heads agree on identical inputs: ours runs on torchvision's own top detections (boxes and labels).

    Comparing the probabilities each side computed on its own boxes is ill-conditioned: the boxes may differ by the
    0.5 px test_top_detections_match allows, and with random weights a box moved by 0.3 px moves some mask
    probabilities by 0.9. Each side's own masks are compared as pasted masks (test_top_masks_match) instead.
    """
    expected = parity_run["torch"]["masks"][:TOP, 0]
    actual = parity_run["ours_masks_on_torch_boxes"]
    assert expected.shape == actual.shape == (TOP, 28, 28)
    np.testing.assert_allclose(actual, expected, atol=5e-4)


def test_top_masks_match(parity_run):
    """Each side's own 28 x 28 probabilities, pasted into the original photograph (ops.paste_masks), agree as masks.

    Both are pasted into torchvision's boxes: box agreement is test_top_detections_match's job, and the random mask
    head draws 2x2 checkerboards (its transposed conv) that alias when a box is smaller than 28 pixels, so a box
    edge moving by 1e-3 px can flip a whole row of pixels there. One sampling grid for both keeps this a test of
    the masks.
    """
    expected, actual = parity_run["torch"], parity_run["ours"]
    height, width = parity_run["photo_size"]
    input_h, input_w = parity_run["input_size"]
    boxes = expected["boxes"][:TOP] * np.asarray([width / input_w, height / input_h] * 2, np.float32)
    paste = jax.jit(lambda masks: ops.paste_masks(masks, boxes, (height, width)))
    expected_masks = np.asarray(paste(expected["masks"][:TOP, 0]))
    actual_masks = np.asarray(paste(actual["masks"][:TOP]))
    intersection = (expected_masks & actual_masks).sum((1, 2))
    union = (expected_masks | actual_masks).sum((1, 2))
    # Random weights leave some masks below 0.5 everywhere: empty on both sides counts as agreement.
    assert (union > 0).sum() >= TOP // 2, "too few non-empty masks for the comparison to mean anything"
    iou = np.where(union > 0, intersection / np.maximum(union, 1), 1.0)
    assert iou.min() >= 0.95, f"mask IoUs {np.sort(iou)[:5]}"


# ----------------------------------------------------------------------------------------------------
# End to end: the import CLI's checkpoint in our Predictor against torchvision's model([photo]), on photographs of
# several sizes and aspect ratios, with configs/torchvision_maskrcnn_r50_fpn.py as it is (no canvas override).


@pytest.fixture(scope="module")
def imported_predictor(reference, tmp_path_factory):
    """Ours from the .pth file through `python -m maskrcnn_jax.convert` and `Predictor.from_checkpoint`, with the
    config file as it is: padded canvases, as torchvision pads."""
    torch, model = reference
    root = tmp_path_factory.mktemp("imported")
    torch.save(model.state_dict(), root / "maskrcnn_resnet50_fpn.pth")
    workdir = root / "workdir"
    subprocess.run([sys.executable, "-m", "maskrcnn_jax.convert", "--from=torchvision",
                    str(root / "maskrcnn_resnet50_fpn.pth"), f"--out={workdir}",
                    "--config=configs/torchvision_maskrcnn_r50_fpn.py"],
                   check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return Predictor.from_checkpoint(str(workdir))


@pytest.fixture(scope="module")
def photos_run(reference, imported_predictor):
    """{name: (torchvision's model([photo]), our Predictor's result)}: each side does all of its own work on the
    uint8 photograph (resize and normalise, pad, predict, map the boxes back, paste the masks). Ours gets the
    photographs as one list."""
    torch, model = reference
    photos = photographs()
    expected = torchvision_predictions(torch, model, photos)
    actual = imported_predictor(list(photos.values()), score_threshold=0.0)
    return {name: (expected[name], result) for name, result in zip(photos, actual)}


def test_predictor_gives_torchvisions_detections_on_photographs(photos_run):
    for name, (expected, actual) in photos_run.items():
        assert len(expected["scores"]) >= TOP and len(actual["scores"]) >= TOP, name
        np.testing.assert_array_equal(actual["labels"][:TOP], expected["labels"][:TOP], err_msg=name)  # label = id
        np.testing.assert_allclose(actual["scores"][:TOP], expected["scores"][:TOP], atol=1e-3, err_msg=name)
        np.testing.assert_allclose(actual["boxes"][:TOP], expected["boxes"][:TOP], atol=0.5, err_msg=name)
    assert photos_run["grace_hopper"][1]["names"][0] != "N/A"  # COCO's names (a random model also fires unused ids)


def test_predictor_masks_overlap_torchvisions_on_photographs(photos_run):
    """With configs/torchvision_maskrcnn_r50_fpn.py our masks are pasted by torchvision's rule (a padded grid in
    integer boxes, binarised > 0.5), so the top 50 agree to a median IoU of 0.95."""
    for name, (expected, actual) in photos_run.items():
        assert expected["masks"].shape[2:] == actual["masks"].shape[1:], name
        stats = compare_detections(expected, actual)
        assert stats["nonempty_masks"] >= TOP // 2, f"{name}: too few non-empty masks for the comparison to mean anything"
        assert stats["median_mask_iou"] >= 0.95, f"{name}: {stats}"


def test_each_photograph_canvas_compiles_once(photos_run, imported_predictor):
    assert sorted(imported_predictor.compiled_shapes) == [(1, 800, 1216, 3), (1, 960, 800, 3), (1, 1280, 800, 3)]
