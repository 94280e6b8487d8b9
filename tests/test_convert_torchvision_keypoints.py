"""Keypoint R-CNN parity: torchvision's keypointrcnn_resnet50_fpn and ours with its converted weights, end to end on
photographs, each side doing all of its own work on the uint8 photograph.

torchvision's model has seeded random weights with randomised BatchNorm statistics and biases (as in
test_convert_torchvision.py), and its person logit raised by 4, so its detections are confident and many. Ours comes from the .pth file through
`python -m maskrcnn_jax.convert` (which recognises a Keypoint R-CNN and takes
configs/torchvision_keypointrcnn_r50_fpn.py) and `Predictor.from_checkpoint`; its keypoints are decoded on the host
by torchvision's rule (serving/keypoints.py) and scaled back to the photograph as torchvision's resize_keypoints
does.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from maskrcnn_jax.serving.predictor import Predictor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchvision_reference import grace_hopper, randomize_torchvision_model, torchvision_predictions  # noqa: E402

TOP = 20


def photographs():
    """grace_hopper (600 x 512, on a 960 x 800 canvas) and a portrait crop of scikit-image's astronaut (512 x 320,
    on 1280 x 800)."""
    from skimage import data

    return {"grace_hopper": grace_hopper(), "astronaut_portrait": np.ascontiguousarray(data.astronaut()[:, 100:420])}


@pytest.fixture(scope="module")
def keypoint_run(tmp_path_factory):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.detection.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    randomize_torchvision_model(torch, model)
    with torch.no_grad():
        # Two classes: a confident person, so that many detections pass the 0.05 threshold.
        model.roi_heads.box_predictor.cls_score.bias[1] += 4.0
        # Random heads put heatmap logits (the keypoint scores) near 45; a trained model's are a few units.
        model.roi_heads.keypoint_predictor.kps_score_lowres.weight.mul_(0.05)
    root = tmp_path_factory.mktemp("keypoints")
    torch.save(model.state_dict(), root / "keypointrcnn_resnet50_fpn.pth")
    workdir = root / "workdir"
    subprocess.run([sys.executable, "-m", "maskrcnn_jax.convert", "--from=torchvision",
                    str(root / "keypointrcnn_resnet50_fpn.pth"), f"--out={workdir}"],
                   check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    predictor = Predictor.from_checkpoint(str(workdir))
    photos = photographs()
    expected = torchvision_predictions(torch, model, photos)
    actual = predictor(list(photos.values()), score_threshold=0.0)
    return predictor, {name: (expected[name], result) for name, result in zip(photos, actual)}


def test_the_import_is_a_keypoint_model_with_cocos_person_keypoints(keypoint_run):
    predictor, _ = keypoint_run
    assert predictor.config.model.keypoint_on and not predictor.config.model.mask_on
    assert predictor.spec.names == ("person",) and len(predictor.spec.keypoint_names) == 17
    assert predictor.spec.keypoint_names[:3] == ("nose", "left_eye", "right_eye")


def test_top_detections_and_keypoints_equal_torchvisions(keypoint_run):
    _, runs = keypoint_run
    for name, (expected, actual) in runs.items():
        assert len(expected["scores"]) >= TOP and len(actual["scores"]) >= TOP, name
        assert "masks" not in actual
        np.testing.assert_array_equal(actual["labels"][:TOP], expected["labels"][:TOP], err_msg=name)
        np.testing.assert_allclose(actual["scores"][:TOP], expected["scores"][:TOP], atol=1e-3, err_msg=name)
        np.testing.assert_allclose(actual["boxes"][:TOP], expected["boxes"][:TOP], atol=0.5, err_msg=name)
        assert actual["keypoints"].shape == (len(actual["scores"]), 17, 3)
        np.testing.assert_allclose(actual["keypoints"][:TOP, :, :2], expected["keypoints"][:TOP, :, :2], atol=1.0,
                                   err_msg=name)
        # Keypoint scores are heatmap logits (up to a few units), so the float32 noise of two convolution libraries
        # scales with them: relative as well as absolute.
        np.testing.assert_allclose(actual["keypoints"][:TOP, :, 2], expected["keypoints_scores"][:TOP], atol=1e-3,
                                   rtol=1e-3, err_msg=name)
