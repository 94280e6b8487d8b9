"""Weight import: layout conversions against torch, the torchvision and detectron2 key layouts, fine-tuning merges
and the command line. The full-model torchvision parity run is in test_convert_torchvision.py."""

import logging
import os
import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.convert import (
    COCO_CATEGORY_IDS,
    keep_class_slots,
    from_detectron2,
    from_torchvision,
    load_detectron2_pickle,
    merge_pretrained,
    missing_variables,
)
from maskrcnn_jax import config as config_lib
from maskrcnn_jax.convert.configs import default_config
from maskrcnn_jax.convert.layout import conv_transpose_kernel, dense_kernel_from_nchw_flatten, flatten
from maskrcnn_jax.modeling.mask_rcnn import build_model
from maskrcnn_jax.modeling.heads import FCNMaskHead

from detectron2_zoo import RESNET_BLOCKS, detectron2_c4_zoo_shapes, detectron2_zoo_shapes

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
CLASS_LAYERS = {"params/box_head/cls_score/kernel", "params/box_head/cls_score/bias", "params/box_head/bbox_pred/kernel",
                "params/box_head/bbox_pred/bias", "params/mask_head/mask_fcn_logits/kernel",
                "params/mask_head/mask_fcn_logits/bias"}


def model_template(config):
    """Abstract {"params", "batch_stats"} of the model `config` describes (shapes only, nothing computed)."""
    model = build_model(config.model)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.asarray([[64, 64]]))
    return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}


def assert_same_structure(template, variables):
    flat_template, flat = flatten(template), flatten(variables)
    assert sorted(flat_template) == sorted(flat)
    for path, leaf in flat_template.items():
        assert tuple(flat[path].shape) == tuple(leaf.shape), path


# -- layouts against torch -------------------------------------------------------------------------------------


def test_conv_transpose_kernel_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 5, 4, 3), dtype=np.float32)  # NHWC
    deconv = torch.nn.ConvTranspose2d(3, 6, 2, stride=2)
    with torch.no_grad():
        expected = deconv(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    from maskrcnn_jax.layers.deconv import Deconv2x2

    layer = Deconv2x2(6)
    params = {"kernel": conv_transpose_kernel(deconv.weight.detach().numpy()), "bias": deconv.bias.detach().numpy()}
    actual = layer.apply({"params": params}, x)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_first_fc_input_permutation_matches_torch(rng):
    torch = pytest.importorskip("torch")
    channels, side = 8, 7
    pooled = rng.standard_normal((3, side, side, channels), dtype=np.float32)  # NHWC RoI features
    linear = torch.nn.Linear(channels * side * side, 5)
    with torch.no_grad():
        expected = linear(torch.from_numpy(pooled.transpose(0, 3, 1, 2)).flatten(1)).numpy()
    kernel = dense_kernel_from_nchw_flatten(linear.weight.detach().numpy(), channels)
    actual = pooled.reshape(3, -1) @ kernel + linear.bias.detach().numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_mask_head_matches_torchvision(rng):
    """torchvision's MaskRCNNHeads + MaskRCNNPredictor against our FCNMaskHead with converted weights."""
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    torch.manual_seed(int(rng.integers(1 << 30)))
    heads, predictor = MaskRCNNHeads(16, [16, 16, 16, 16], 1), MaskRCNNPredictor(16, 16, 5)
    state = {f"roi_heads.mask_head.{k}": v for k, v in heads.state_dict().items()}
    state.update({f"roi_heads.mask_predictor.{k}": v for k, v in predictor.state_dict().items()})
    with torch.no_grad():
        for value in state.values():
            value.normal_(0.0, 0.2)
    # The mask-head keys alone, plus the two keys that make a state dict read as a detection model.
    converted = {"params": from_torchvision({**_tiny_detection_keys(), **state})["params"]["mask_head"]}
    x = rng.standard_normal((3, 14, 14, 16), dtype=np.float32)
    with torch.no_grad():
        expected = predictor(heads(torch.from_numpy(x.transpose(0, 3, 1, 2)))).numpy().transpose(0, 2, 3, 1)
    actual = FCNMaskHead(num_masks=5, conv_dim=16).apply({"params": converted["params"]}, x)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def _tiny_detection_keys():
    """The smallest state dict that reads as a torchvision detection model (an FPN lateral gives its width)."""
    return {"backbone.body.conv1.weight": np.zeros((4, 3, 7, 7), np.float32),
            "backbone.fpn.inner_blocks.0.0.weight": np.zeros((16, 4, 1, 1), np.float32)}


# -- torchvision layouts ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchvision_state_dict():
    torch = pytest.importorskip("torch")
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    return {key: value.numpy() for key, value in model.state_dict().items()}


def coco_v1_layout(state_dict):
    """The key names of the released COCO_V1 file (torchvision <= 0.12 modules; current torchvision upgrades them
    in _load_from_state_dict): no Conv2dNormActivation wrappers and named mask_fcn layers; FrozenBN without a step
    counter."""
    renamed = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            key = key.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
            key = key.replace(f"backbone.fpn.inner_blocks.{i}.0.", f"backbone.fpn.inner_blocks.{i}.")
            key = key.replace(f"backbone.fpn.layer_blocks.{i}.0.", f"backbone.fpn.layer_blocks.{i}.")
        renamed[key] = value
    return renamed


def test_torchvision_maskrcnn_covers_every_variable(torchvision_state_dict):
    config = default_config("torchvision")
    variables = from_torchvision(torchvision_state_dict)
    assert_same_structure(model_template(config), variables)
    count = sum(v.size for v in jax.tree_util.tree_leaves(variables))
    assert count == 44_507_633  # torchvision's parameter count (num_batches_tracked aside)


def test_torchvision_coco_v1_layout_converts_the_same(torchvision_state_dict):
    current = flatten(from_torchvision(torchvision_state_dict))
    released = flatten(from_torchvision(coco_v1_layout(torchvision_state_dict)))
    assert sorted(current) == sorted(released)
    for path in current:
        np.testing.assert_array_equal(current[path], released[path])


def test_torchvision_bn_norm_puts_affine_in_params(torchvision_state_dict):
    variables = from_torchvision(torchvision_state_dict, norm="bn")
    config = default_config("torchvision")
    config.model.backbone.norm = "bn"
    assert_same_structure(model_template(config), variables)


def test_torchvision_unknown_keys_raise(torchvision_state_dict):
    with pytest.raises(ValueError, match="no counterpart"):
        from_torchvision({**torchvision_state_dict, "roi_heads.densepose_head.0.weight": np.zeros((1, 1, 1, 1))})


@pytest.fixture(scope="module")
def keypoint_state_dict():
    torch = pytest.importorskip("torch")
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.detection.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    return model, {key: value.numpy() for key, value in model.state_dict().items()}


def test_torchvision_keypointrcnn_covers_every_variable(keypoint_state_dict):
    model, state_dict = keypoint_state_dict
    variables = from_torchvision(state_dict)
    assert_same_structure(model_template(default_config("torchvision_keypoints")), variables)
    count = sum(v.size for v in jax.tree_util.tree_leaves(variables))
    torch_count = sum(v.size for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))
    assert count == torch_count


def test_torchvision_keypoint_head_converts_to_the_same_function(keypoint_state_dict, rng):
    """The converted keypoint head on random 14 x 14 RoI features equals torchvision's keypoint_head +
    keypoint_predictor (56 x 56 heatmap logits)."""
    import torch

    from maskrcnn_jax.modeling.keypoint_head import KeypointHead

    model, state_dict = keypoint_state_dict
    params = from_torchvision(state_dict)["params"]["keypoint_head"]
    features = rng.normal(size=(3, 14, 14, 256)).astype(np.float32)
    ours = np.asarray(KeypointHead(num_keypoints=17).apply({"params": params}, jnp.asarray(features)))
    with torch.no_grad():
        heads = model.roi_heads
        expected = heads.keypoint_predictor(heads.keypoint_head(torch.tensor(features).permute(0, 3, 1, 2)))
    np.testing.assert_allclose(ours, expected.permute(0, 2, 3, 1).numpy(), rtol=1e-4,
                               atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("depth", [50, 101])
def test_torchvision_imagenet_resnet_is_the_backbone_body(depth):
    torch = pytest.importorskip("torch")
    import torchvision

    torch.manual_seed(0)
    resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    imported = from_torchvision(resnet.state_dict())
    config = default_config("torchvision")
    config.model.backbone.depth = depth
    template = model_template(config)
    missing = missing_variables(template, imported)
    assert missing and all(not name.startswith(("params/backbone/body", "batch_stats/backbone/body"))
                           for name in missing)
    assert {name.split("/")[1] for name in missing} == {"backbone", "rpn_head", "box_head", "mask_head"}
    fresh = jax.tree.map(lambda s: jnp.full(s.shape, -7.0, s.dtype), template)
    merged, report = merge_pretrained(fresh, imported)
    assert report.reinitialized == [] and sorted(report.kept_initial) == missing
    kernel = merged["params"]["backbone"]["body"]["layer3"]["block_0"]["conv2"]["kernel"]
    np.testing.assert_array_equal(kernel, resnet.layer3[0].conv2.weight.detach().numpy().transpose(2, 3, 1, 0))
    assert float(merged["params"]["box_head"]["fc6"]["kernel"][0, 0]) == -7.0


# -- detectron2 layouts ----------------------------------------------------------------------------------------


def msra_caffe2_shapes(depth=50):
    """{blob: shape} of the MSRA ImageNet R-{depth}.pkl (Detectron's Caffe2 names, which detectron2's
    convert_basic_c2_names reads): conv1_w, res_conv1_bn_{s,b}, res{2-5}_{b}_branch{1,2a,2b,2c}_{w,bn_s,bn_b},
    the ImageNet classifier fc1000_{w,b}, and (in some copies) optimizer momentum blobs."""
    shapes = {"conv1_w": (64, 3, 7, 7), "res_conv1_bn_s": (64,), "res_conv1_bn_b": (64,),
              "fc1000_w": (1000, 2048), "fc1000_b": (1000,), "conv1_w_momentum": (64, 3, 7, 7)}
    in_channels = 64
    for stage, blocks in enumerate(RESNET_BLOCKS[depth]):
        planes = 64 * 2**stage
        for block in range(blocks):
            prefix = f"res{stage + 2}_{block}"
            branches = {"branch2a": (planes, in_channels, 1), "branch2b": (planes, planes, 3),
                        "branch2c": (planes * 4, planes, 1)}
            if block == 0:
                branches["branch1"] = (planes * 4, in_channels, 1)
            for branch, (out_channels, cin, kernel) in branches.items():
                shapes[f"{prefix}_{branch}_w"] = (out_channels, cin, kernel, kernel)
                shapes[f"{prefix}_{branch}_bn_s"] = (out_channels,)
                shapes[f"{prefix}_{branch}_bn_b"] = (out_channels,)
            in_channels = planes * 4
    return shapes


def random_weights(shapes, rng):
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def test_detectron2_zoo_pickle_maps_every_key_to_one_variable(rng, tmp_path):
    weights = random_weights(detectron2_zoo_shapes(), rng)
    path = tmp_path / "model_final_f10217.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo"}, f)
    loaded = load_detectron2_pickle(str(path))
    assert sorted(loaded) == sorted(weights)
    variables = from_detectron2(loaded)
    assert_same_structure(model_template(default_config("detectron2")), variables)
    # One variable per key (pixel_mean / pixel_std carry no weights): sizes add up, plus the zero background slots
    # of the 4-delta box regressor and the mask predictor (1024 x 4 + 4 and 256 + 1 numbers).
    imported = sum(v.size for k, v in weights.items() if not k.startswith("pixel_"))
    assert sum(v.size for v in jax.tree_util.tree_leaves(variables)) == imported + 1024 * 4 + 4 + 256 + 1


def test_detectron2_class_layout(rng):
    weights = random_weights(detectron2_zoo_shapes(num_classes=80), rng)
    params = from_detectron2(weights)["params"]
    features = rng.standard_normal((5, 1024)).astype(np.float32)

    def torch_linear(name):
        return features @ weights[f"{name}.weight"].T + weights[f"{name}.bias"]

    def ours(module):
        return features @ params["box_head"][module]["kernel"] + params["box_head"][module]["bias"]

    # Classifier: detectron2's background is its last logit, ours the first; class i is our label i + 1.
    d2_logits, our_logits = torch_linear("roi_heads.box_predictor.cls_score"), ours("cls_score")
    np.testing.assert_allclose(our_logits[:, 0], d2_logits[:, 80], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(our_logits[:, 1:], d2_logits[:, :80], rtol=1e-5, atol=1e-4)
    # Box deltas: detectron2's class i (4 rows each, no background) is our slot i + 1; slot 0 is zero.
    d2_deltas = torch_linear("roi_heads.box_predictor.bbox_pred").reshape(5, 80, 4)
    our_deltas = ours("bbox_pred").reshape(5, 81, 4)
    np.testing.assert_allclose(our_deltas[:, 1:], d2_deltas, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(our_deltas[:, 0], 0.0)
    # Masks: channel i + 1 is detectron2's class i.
    mask_kernel = params["mask_head"]["mask_fcn_logits"]["kernel"][0, 0]  # [256, 81]
    np.testing.assert_array_equal(mask_kernel[:, 1:], weights["roi_heads.mask_head.predictor.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(mask_kernel[:, 0], 0.0)


def test_detectron2_class_agnostic_box_regression_is_repeated(rng):
    shapes = detectron2_zoo_shapes(num_classes=3)
    shapes["roi_heads.box_predictor.bbox_pred.weight"], shapes["roi_heads.box_predictor.bbox_pred.bias"] = (4, 1024), (4,)
    weights = random_weights(shapes, rng)
    kernel = from_detectron2(weights)["params"]["box_head"]["bbox_pred"]["kernel"].reshape(1024, 4, 4)
    for slot in range(4):
        np.testing.assert_array_equal(kernel[:, slot], weights["roi_heads.box_predictor.bbox_pred.weight"].T)


def test_detectron2_bgr_first_conv_reads_rgb(rng):
    """With input_order="rgb", the first conv applied to an RGB image equals detectron2's on the BGR image."""
    weights = random_weights(msra_caffe2_shapes(), rng)
    image_rgb = rng.standard_normal((1, 16, 16, 3)).astype(np.float32)

    def conv(kernel, image):
        return jax.lax.conv_general_dilated(image, kernel, (2, 2), ((3, 3), (3, 3)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    rgb_kernel = from_detectron2(weights)["params"]["backbone"]["body"]["conv1"]["kernel"]
    bgr_kernel = from_detectron2(weights, input_order="bgr")["params"]["backbone"]["body"]["conv1"]["kernel"]
    np.testing.assert_array_equal(bgr_kernel, weights["conv1_w"].transpose(2, 3, 1, 0))
    np.testing.assert_allclose(conv(rgb_kernel, image_rgb), conv(bgr_kernel, image_rgb[..., ::-1]), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("depth", [50, 101])
def test_msra_caffe2_backbone(rng, tmp_path, depth):
    weights = random_weights(msra_caffe2_shapes(depth), rng)
    path = tmp_path / f"R-{depth}.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": weights}, f, protocol=2)
    imported = from_detectron2(load_detectron2_pickle(str(path)))
    config = default_config("detectron2")
    config.model.backbone.depth = depth
    missing = missing_variables(model_template(config), imported)
    assert missing and not any("/body/" in name for name in missing)  # the whole body, nothing else
    stats = imported["batch_stats"]["backbone"]["body"]["layer2"]["block_0"]["downsample_bn"]
    np.testing.assert_array_equal(stats["weight"], weights["res3_0_branch1_bn_s"])
    np.testing.assert_array_equal(stats["bias"], weights["res3_0_branch1_bn_b"])
    np.testing.assert_array_equal(stats["running_mean"], 0.0)
    np.testing.assert_array_equal(stats["running_var"], 1.0)
    conv2 = imported["params"]["backbone"]["body"]["layer4"]["block_2"]["conv2"]["kernel"]
    np.testing.assert_array_equal(conv2, weights["res5_2_branch2b_w"].transpose(2, 3, 1, 0))


def c4_config(name="detectron2_maskrcnn_r50_c4.py", depth=50):
    config = config_lib.load(CONFIGS / name)
    config.model.backbone.depth = depth
    return config


@pytest.mark.parametrize("depth", [50, 101])
def test_detectron2_c4_zoo_pickle_maps_every_key_to_one_variable(rng, tmp_path, depth):
    """detectron2's R-{50,101}-C4 layout (bare ResNet to res4, res5 under roi_heads) fills every variable of the C4
    model of configs/detectron2_maskrcnn_r50_c4.py, each from its own key."""
    weights = random_weights(detectron2_c4_zoo_shapes(depth), rng)
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo"}, f)
    variables = from_detectron2(load_detectron2_pickle(str(path)))
    assert_same_structure(model_template(c4_config(depth=depth)), variables)
    imported = sum(v.size for k, v in weights.items() if not k.startswith("pixel_"))
    assert sum(v.size for v in jax.tree_util.tree_leaves(variables)) == imported + 2048 * 4 + 4 + 256 + 1
    params, stats = variables["params"], variables["batch_stats"]
    kernel = lambda name: weights[name].transpose(2, 3, 1, 0)  # noqa: E731
    # Only the stem's kernel reads the image (BGR -> RGB); res5's first conv keeps its channel order.
    np.testing.assert_array_equal(params["backbone"]["body"]["conv1"]["kernel"],
                                  kernel("backbone.stem.conv1.weight")[:, :, ::-1])
    np.testing.assert_array_equal(params["res5"]["block_0"]["conv1"]["kernel"], kernel("roi_heads.res5.0.conv1.weight"))
    np.testing.assert_array_equal(params["res5"]["block_2"]["conv3"]["kernel"], kernel("roi_heads.res5.2.conv3.weight"))
    np.testing.assert_array_equal(params["backbone"]["body"]["layer3"]["block_5"]["conv2"]["kernel"],
                                  kernel("backbone.res4.5.conv2.weight"))
    np.testing.assert_array_equal(stats["res5"]["block_0"]["downsample_bn"]["running_var"],
                                  weights["roi_heads.res5.0.shortcut.norm.running_var"])
    np.testing.assert_array_equal(params["mask_head"]["conv5_mask"]["kernel"],
                                  weights["roi_heads.mask_head.deconv.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(params["rpn_head"]["cls_logits"]["kernel"],
                                  kernel("proposal_generator.rpn_head.objectness_logits.weight"))
    np.testing.assert_array_equal(params["box_head"]["cls_score"]["kernel"][:, 1:],
                                  weights["roi_heads.box_predictor.cls_score.weight"][:-1].T)


def test_command_line_recognises_a_detectron2_c4_file(rng, tmp_path):
    """`python -m maskrcnn_jax.convert --from=detectron2` on a C4 zoo file (roi_heads.res5) without --config takes
    configs/detectron2_maskrcnn_r50_c4.py."""
    import json
    import subprocess
    import sys

    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": random_weights(detectron2_c4_zoo_shapes(50), rng)}, f)
    workdir = tmp_path / "workdir"
    subprocess.run([sys.executable, "-m", "maskrcnn_jax.convert", "--from=detectron2", str(path), f"--out={workdir}"],
                   check=True, cwd=tmp_path)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["backbone"]["kind"] == "c4" and saved["model"]["roi_heads"]["pool_strides"] == [16]


def test_imagenet_backbones_for_c4_put_the_fifth_stage_at_res5(rng):
    """An ImageNet ResNet-50 (torchvision's, or MSRA's Caffe2 R-50.pkl) imported for a C4 model: its stem to layer3
    are the body, its layer4 is res5; merged, they fill the C4 model's backbone and res5, nothing else."""
    torch = pytest.importorskip("torch")
    import torchvision

    template = model_template(c4_config("coco_r50_c4_1x.py"))
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    msra = random_weights(msra_caffe2_shapes(50), rng)
    for imported in (from_torchvision(resnet.state_dict(), backbone_kind="c4"),
                     from_detectron2(msra, backbone_kind="c4")):
        missing = missing_variables(template, imported)
        assert {name.split("/")[1] for name in missing} == {"rpn_head", "box_head", "mask_head"}
        merged, report = merge_pretrained(template, imported)
        assert sorted(report.kept_initial) == missing and report.reinitialized == []
    torchvision_import = from_torchvision(resnet.state_dict(), backbone_kind="c4")
    np.testing.assert_array_equal(torchvision_import["params"]["res5"]["block_2"]["conv3"]["kernel"],
                                  resnet.layer4[2].conv3.weight.detach().numpy().transpose(2, 3, 1, 0))
    msra_import = from_detectron2(msra, backbone_kind="c4")
    np.testing.assert_array_equal(msra_import["batch_stats"]["res5"]["block_0"]["downsample_bn"]["weight"],
                                  msra["res5_0_branch1_bn_s"])
    # The FPN model keeps layer4 in the body, as before.
    assert "layer4" in from_torchvision(resnet.state_dict())["params"]["backbone"]["body"]
    with pytest.raises(ValueError, match="backbone_kind"):
        from_torchvision(resnet.state_dict(), backbone_kind="c3")


def test_torchvision_imagenet_resnext_is_the_backbone_body():
    """torchvision's resnext50_32x4d ImageNet layout fills the ResNeXt-FPN body (grouped conv2 kernels included)."""
    torch = pytest.importorskip("torch")
    import torchvision

    torch.manual_seed(0)
    resnext = torchvision.models.resnext50_32x4d(weights=None)
    imported = from_torchvision(resnext.state_dict())
    config = config_lib.load(CONFIGS / "coco_x101_fpn_1x.py")
    config.model.backbone.depth, config.model.backbone.width_per_group = 50, 4
    missing = missing_variables(model_template(config), imported)
    assert missing and not any(name.startswith(("params/backbone/body", "batch_stats/backbone/body"))
                               for name in missing)
    conv2 = imported["params"]["backbone"]["body"]["layer2"]["block_0"]["conv2"]["kernel"]
    assert conv2.shape == (3, 3, 8, 256)  # 32 groups of 8 channels
    np.testing.assert_array_equal(conv2, resnext.layer2[0].conv2.weight.detach().numpy().transpose(2, 3, 1, 0))


def test_detectron2_unknown_names_raise(rng):
    weights = random_weights(msra_caffe2_shapes(), rng)
    with pytest.raises(ValueError, match="unknown Caffe2 blob"):
        from_detectron2({**weights, "res2_0_branch3_w": np.zeros((1, 1, 1, 1), np.float32)})
    zoo = random_weights(detectron2_zoo_shapes(num_classes=2), rng)
    with pytest.raises(ValueError, match="no counterpart"):
        from_detectron2({**zoo, "roi_heads.keypoint_head.conv_fcn1.weight": np.zeros((1, 1, 3, 3), np.float32)})


# -- fine-tuning -----------------------------------------------------------------------------------------------


def test_finetune_reinitialises_only_class_dependent_layers(rng, caplog):
    weights = random_weights(detectron2_zoo_shapes(num_classes=80), rng)
    imported = from_detectron2(weights)
    config = default_config("detectron2")
    config.model.num_classes = 4
    fresh = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), model_template(config))
    with caplog.at_level(logging.INFO, logger="maskrcnn_jax.convert.finetune"):
        merged, report = merge_pretrained(fresh, imported)
    assert set(report.reinitialized) == CLASS_LAYERS
    assert report.kept_initial == []
    logged = caplog.text
    for name in CLASS_LAYERS:
        assert name in logged
        np.testing.assert_array_equal(flatten(merged)[tuple(name.split("/"))], 0.5)
    fc7 = merged["params"]["box_head"]["fc7"]["kernel"]
    np.testing.assert_array_equal(fc7, weights["roi_heads.box_head.fc2.weight"].T)


def test_finetune_rejects_other_mismatches(rng):
    imported = from_detectron2(random_weights(detectron2_zoo_shapes(), rng))
    config = default_config("detectron2")
    config.model.roi_heads.fc_dim = 512  # a class-independent layer of another size
    with pytest.raises(ValueError, match="not a class-dependent layer"):
        merge_pretrained(model_template(config), imported)
    config = default_config("detectron2")
    config.model.backbone.norm = "gn"  # GroupNorm has no running statistics to receive
    with pytest.raises(ValueError, match="do not exist in this model"):
        merge_pretrained(model_template(config), imported)


def test_keep_class_slots_maps_torchvision_coco_ids_to_contiguous_labels(rng, torchvision_state_dict):
    assert len(COCO_CATEGORY_IDS) == 80 and COCO_CATEGORY_IDS[-1] == 90 and 12 not in COCO_CATEGORY_IDS
    full = from_torchvision(torchvision_state_dict)
    slots = (0, *COCO_CATEGORY_IDS)
    kept = keep_class_slots(full, slots)
    config = default_config("torchvision")
    config.model.num_classes = 81
    assert_same_structure(model_template(config), kept)
    features = rng.standard_normal((3, 1024)).astype(np.float32)
    head, kept_head = full["params"]["box_head"], kept["params"]["box_head"]
    dense = lambda layer, x: x @ layer["kernel"] + layer["bias"]  # noqa: E731
    np.testing.assert_allclose(dense(kept_head["cls_score"], features), dense(head["cls_score"], features)[:, slots],
                               rtol=1e-5, atol=1e-5)
    deltas = dense(head["bbox_pred"], features).reshape(3, 91, 4)
    np.testing.assert_allclose(dense(kept_head["bbox_pred"], features).reshape(3, 81, 4), deltas[:, slots],
                               rtol=1e-5, atol=1e-5)
    label = 80  # our last contiguous label is COCO id 90 (toothbrush)
    np.testing.assert_array_equal(kept["params"]["mask_head"]["mask_fcn_logits"]["kernel"][..., label],
                                  full["params"]["mask_head"]["mask_fcn_logits"]["kernel"][..., 90])
    with pytest.raises(ValueError, match="background slot 0 first"):
        keep_class_slots(full, COCO_CATEGORY_IDS)


# -- configs and the command line ------------------------------------------------------------------------------


def test_torchvision_config_normalises_like_torchvision(rng):
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    config = default_config("torchvision")
    transform = GeneralizedRCNNTransform(800, 1333, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    pixels = rng.integers(0, 256, (3, 8, 8)).astype(np.float32)
    expected = transform.normalize(torch.from_numpy(pixels / 255)).numpy()
    mean = np.asarray(config.data.pixel_mean, np.float32)[:, None, None]
    std = np.asarray(config.data.pixel_std, np.float32)[:, None, None]
    np.testing.assert_allclose((pixels - mean) / std, expected, rtol=1e-5, atol=1e-5)
    assert (config.data.short_side, config.data.long_side_max) == (transform.min_size[0], transform.max_size)
    assert config.model.roi_heads.aligned is False and config.model.roi_heads.sampling_ratio == 2
    assert all(side % 32 == 0 for side in config.data.canvas_size)


def test_command_line_writes_a_training_checkpoint(tmp_path, torchvision_state_dict):
    """`python -m maskrcnn_jax.convert` on a .pth in the released COCO_V1 key layout (a subprocess: the CLI defines
    absl flags that other entry points define too)."""
    torch = pytest.importorskip("torch")
    import subprocess
    import sys

    import orbax.checkpoint as ocp

    source = tmp_path / "maskrcnn.pth"
    torch.save({k: torch.from_numpy(v) for k, v in coco_v1_layout(torchvision_state_dict).items()}, source)
    workdir = tmp_path / "workdir"
    subprocess.run([sys.executable, "-m", "maskrcnn_jax.convert", "--from=torchvision", str(source),
                    f"--out={workdir}"], check=True, cwd=tmp_path)
    assert os.path.exists(workdir / "config.json")
    manager = ocp.CheckpointManager(str(workdir / "checkpoints"), item_names=("state", "data"))
    assert manager.latest_step() == 0
    restored = manager.restore(0, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                           data=ocp.args.JsonRestore()))
    manager.close()
    assert restored["data"] == {"batches_consumed": 0}
    expected = from_torchvision(torchvision_state_dict)
    for collection in ("params", "batch_stats"):
        flat_expected, flat_restored = flatten(expected[collection]), flatten(restored["state"][collection])
        assert sorted(flat_expected) == sorted(flat_restored)
        for path, value in flat_expected.items():
            np.testing.assert_array_equal(np.asarray(flat_restored[path]), value)


def test_backbone_only_checkpoint_initialises_the_rest(tmp_path):
    """An ImageNet ResNet written as a checkpoint: the body comes from the file, every other variable from the
    config's seed (as a fresh training run would draw it), nothing left abstract."""
    torch = pytest.importorskip("torch")
    import orbax.checkpoint as ocp
    import torchvision

    from maskrcnn_jax.convert.checkpoint import write_checkpoint

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    config = default_config("torchvision")
    m = config.model
    m.num_classes, m.backbone.depth, m.backbone.fpn_channels = 4, 18, 32
    m.rpn.pre_nms_topk_test = m.rpn.post_nms_topk_test = 50
    m.roi_heads.fc_dim, m.roi_heads.mask_conv_dim, m.detection.detections_per_image = 32, 16, 5
    config.data.canvas_size = (64, 64)
    imported = from_torchvision(resnet.state_dict())
    write_checkpoint(str(tmp_path), config, imported)
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"), item_names=("state", "data"))
    state = manager.restore(0, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                        data=ocp.args.JsonRestore()))["state"]
    manager.close()
    assert_same_structure(model_template(config), {"params": state["params"], "batch_stats": state["batch_stats"]})
    np.testing.assert_array_equal(state["params"]["backbone"]["body"]["conv1"]["kernel"],
                                  imported["params"]["backbone"]["body"]["conv1"]["kernel"])
    fc6 = np.asarray(state["params"]["box_head"]["fc6"]["kernel"])
    assert np.isfinite(fc6).all() and fc6.std() > 0
