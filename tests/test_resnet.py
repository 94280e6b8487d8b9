"""ResNet body: sizes and numbers against torchvision, the three norms, freeze_at, stride_in_1x1 and bfloat16."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.modeling import ResNet, frozen_param_mask
from maskrcnn_jax.modeling.resnet import Bottleneck, out_channels

FEATURES = ("c2", "c3", "c4", "c5")


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def abstract_variables(model, image_shape=(1, 64, 64, 3)):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(image_shape)))


@pytest.fixture(scope="module")
def resnet18_variables():
    """Initial ResNet-18 variables per norm, one init each for the whole module: the random initialisers
    dominate compile time on a CPU, and the variables do not depend on freeze_at, dtype or image size."""
    cache = {}

    def get(norm):
        if norm not in cache:
            init = ResNet(depth=18, norm=norm).init
            cache[norm] = init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        return cache[norm]

    return get


def torchvision_resnet_variables(state_dict, norm):
    """Flax variables for a torchvision ResNet state dict (fc dropped): the mapping documented in resnet.py."""
    variables = {"params": {}, "batch_stats": {}}
    for key, tensor in state_dict.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if parts[0].startswith("layer"):
            parts = [parts[0], f"block_{parts[1]}"] + parts[2:]
            if parts[2] == "downsample":
                parts = parts[:2] + [("downsample_conv", "downsample_bn")[int(parts[3])]] + parts[4:]
        *path, leaf = parts
        value = tensor.detach().numpy()
        if value.ndim == 4:
            leaf, value, collection = "kernel", value.transpose(2, 3, 1, 0), "params"
        elif norm == "frozen_bn" or leaf.startswith("running_"):
            collection = "batch_stats"
        else:
            collection = "params"
        node = variables[collection]
        for name in path:
            node = node.setdefault(name, {})
        node[leaf] = jnp.asarray(value)
    return {name: tree for name, tree in variables.items() if tree}


def randomize_norms(torch_model, seed):
    """Non-identity norm weights, biases and running statistics, so that a mix-up of any of them shows."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(torch_model.named_parameters()) + list(torch_model.named_buffers()):
        if "bn" not in name and "downsample.1" not in name:
            continue
        with torch.no_grad():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0, generator=generator)
            elif name.endswith("weight"):
                tensor.uniform_(0.5, 1.5, generator=generator)
            elif name.endswith(("bias", "running_mean")):
                tensor.normal_(0.0, 0.2, generator=generator)


def torchvision_resnet(depth, norm):
    torch = pytest.importorskip("torch")
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    norm_layer = {
        "frozen_bn": FrozenBatchNorm2d,
        "bn": torch.nn.BatchNorm2d,
        "gn": lambda channels: torch.nn.GroupNorm(32, channels),
    }[norm]
    torch.manual_seed(depth)
    return getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=norm_layer)


def relative_to_max_error(expected, actual):
    expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    return np.abs(expected - actual).max() / np.abs(expected).max()


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_body_sizes_match_torchvision(depth):
    reference = torchvision_resnet(depth, "frozen_bn")
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    weights = sum(v.numel() for k, v in state.items() if k.endswith("weight") and v.ndim == 4)
    frozen_stats = sum(v.numel() for k, v in state.items()) - weights

    variables = abstract_variables(ResNet(depth=depth))
    assert count(variables["params"]) == weights
    assert count(variables["batch_stats"]) == frozen_stats
    # Same tree, leaf for leaf, as the documented renaming of torchvision's state dict.
    converted = jax.eval_shape(lambda: torchvision_resnet_variables(reference.state_dict(), "frozen_bn"))
    assert jax.tree_util.tree_structure(converted) == jax.tree_util.tree_structure(variables)
    assert [x.shape for x in jax.tree_util.tree_leaves(converted)] == [
        x.shape for x in jax.tree_util.tree_leaves(variables)
    ]


def test_resnet50_sizes_without_torch():
    # torchvision resnet50 minus fc: 23,454,912 conv weights; 26,560 FrozenBN channels x 4 statistics.
    variables = abstract_variables(ResNet(depth=50))
    assert count(variables["params"]) == 23_454_912
    assert count(variables["batch_stats"]) == 4 * 26_560
    assert out_channels(50) == {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}
    assert out_channels(18) == {"c2": 64, "c3": 128, "c4": 256, "c5": 512}


def torchvision_features(torch_model, images_nchw):
    import torch

    m = torch_model
    x = m.maxpool(m.relu(m.bn1(m.conv1(torch.from_numpy(images_nchw)))))
    features = {}
    for name, stage in zip(FEATURES, (m.layer1, m.layer2, m.layer3, m.layer4)):
        x = stage(x)
        features[name] = x.detach().numpy().transpose(0, 2, 3, 1)
    return features


@pytest.mark.parametrize("norm,train", [("frozen_bn", False), ("bn", True), ("bn", False), ("gn", False)])
def test_resnet18_matches_torchvision(rng, norm, train):
    reference = torchvision_resnet(18, norm)
    randomize_norms(reference, seed=1)
    variables = torchvision_resnet_variables(reference.state_dict(), norm)
    # 36x52: odd sizes at every stride (18x26, 9x13, 5x7, 3x4 after the stem) test the explicit padding.
    images = rng.standard_normal((2, 3, 36, 52), dtype=np.float32)

    reference.train(train)
    expected = torchvision_features(reference, images)
    model = ResNet(depth=18, norm=norm)
    actual, updates = model.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), train=train,
                                  mutable=["batch_stats"])
    for name in FEATURES:
        assert actual[name].shape == expected[name].shape
        assert relative_to_max_error(expected[name], actual[name]) < 1e-5, name

    # Statistics after the step: torch's running averages (momentum 0.1, unbiased variance) for bn in training,
    # untouched otherwise.
    after = torchvision_resnet_variables(reference.state_dict(), norm)
    if "batch_stats" in after:
        jax.tree_util.tree_map(
            lambda want, got: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6),
            after["batch_stats"],
            updates["batch_stats"],
        )
        changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                                         updates["batch_stats"])
        assert all(jax.tree_util.tree_leaves(changed)) == train


def test_bn_running_stats_drive_eval(rng, resnet18_variables):
    """In eval an image's features do not depend on its batch companions; in training they do."""
    model = ResNet(depth=18, norm="bn")
    images = jnp.asarray(rng.standard_normal((2, 32, 32, 3), dtype=np.float32))
    variables = resnet18_variables("bn")
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], **updates}

    def c5(batch, train):
        features, _ = model.apply(variables, batch, train=train, mutable=["batch_stats"])
        return np.asarray(features["c5"][0])

    companion = images.at[1].set(images[1] * 3.0 + 1.0)
    np.testing.assert_allclose(c5(images, False), c5(companion, False), rtol=1e-5, atol=1e-5)
    assert relative_to_max_error(c5(images, True), c5(companion, True)) > 1e-2


@pytest.mark.parametrize("freeze_at", [0, 1, 3, 5])
def test_freeze_at_zeroes_gradients_of_frozen_stages(rng, resnet18_variables, freeze_at):
    model = ResNet(depth=18, freeze_at=freeze_at)
    images = jnp.asarray(rng.standard_normal((1, 32, 32, 3), dtype=np.float32))
    variables = resnet18_variables("frozen_bn")
    output_weights = {name: jnp.asarray(rng.standard_normal(shape.shape, dtype=np.float32))
                      for name, shape in model.apply(variables, images).items()}

    def loss(params):
        features = model.apply({**variables, "params": params}, images)
        return sum(jnp.sum(features[name] * output_weights[name]) for name in FEATURES)

    grads = jax.grad(loss)(variables["params"])
    frozen = frozen_param_mask(variables["params"], freeze_at)
    flat_grads = flax.traverse_util.flatten_dict(grads, sep="/")
    flat_frozen = flax.traverse_util.flatten_dict(frozen, sep="/")
    assert flat_grads.keys() == flat_frozen.keys()
    expected_frozen_prefixes = (("conv1", "layer1", "layer2", "layer3", "layer4")[:freeze_at])
    for path, grad in flat_grads.items():
        is_frozen = path.split("/")[0] in expected_frozen_prefixes
        assert flat_frozen[path] == is_frozen, path
        assert bool(jnp.all(grad == 0)) == is_frozen, path


def test_freeze_at_keeps_bn_statistics_of_frozen_stages(rng, resnet18_variables):
    model = ResNet(depth=18, norm="bn", freeze_at=2)
    images = jnp.asarray(rng.standard_normal((2, 32, 32, 3), dtype=np.float32))
    variables = resnet18_variables("bn")
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    for name, before in variables["batch_stats"].items():
        unchanged = jax.tree_util.tree_leaves(
            jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), before, updates["batch_stats"][name]))
        assert all(unchanged) == (name in ("bn1", "layer1")), name
        assert any(unchanged) == (name in ("bn1", "layer1")), name


def test_stride_in_1x1_moves_the_stride(rng):
    """A stride-2 bottleneck with stride_in_1x1 equals torchvision's Bottleneck with its stride moved to conv1."""
    torch = pytest.importorskip("torch")
    from torchvision.models.resnet import Bottleneck as TorchBottleneck
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    downsample = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 1, stride=2, bias=False), FrozenBatchNorm2d(64))
    reference = TorchBottleneck(32, 16, stride=2, downsample=downsample, norm_layer=FrozenBatchNorm2d)
    randomize_norms(reference, seed=2)
    reference.conv1.stride, reference.conv2.stride = (2, 2), (1, 1)
    images = rng.standard_normal((1, 32, 9, 11), dtype=np.float32)
    expected = reference(torch.from_numpy(images)).detach().numpy().transpose(0, 2, 3, 1)

    variables = torchvision_resnet_variables(
        {f"layer1.0.{k}": v for k, v in reference.state_dict().items()}, "frozen_bn")
    variables = {collection: tree["layer1"]["block_0"] for collection, tree in variables.items()}
    block = Bottleneck(planes=16, stride=2, stride_in_1x1=True)
    actual, state = block.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), capture_intermediates=True)
    assert actual.shape == expected.shape == (1, 5, 6, 64)
    assert relative_to_max_error(expected, actual) < 1e-5
    assert state["intermediates"]["conv1"]["__call__"][0].shape == (1, 5, 6, 16)

    default_block = Bottleneck(planes=16, stride=2)
    default_out, default_state = default_block.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)),
                                                     capture_intermediates=True)
    assert default_state["intermediates"]["conv1"]["__call__"][0].shape == (1, 9, 11, 16)
    assert default_out.shape == (1, 5, 6, 64)
    assert relative_to_max_error(expected, default_out) > 1e-2


@pytest.mark.parametrize("norm", ["frozen_bn", "bn", "gn"])
def test_bfloat16_compute_keeps_float32_variables(rng, resnet18_variables, norm):
    images = jnp.asarray(rng.standard_normal((2, 32, 32, 3), dtype=np.float32))
    variables = resnet18_variables(norm)
    half_model = ResNet(depth=18, norm=norm, dtype=jnp.bfloat16)
    full = ResNet(depth=18, norm=norm).apply(variables, images)
    half = half_model.apply(variables, images)
    for name in FEATURES:
        assert half[name].dtype == jnp.bfloat16
        assert relative_to_max_error(full[name], half[name].astype(jnp.float32)) < 5e-2
    # Training mode too: statistics are kept in float32.
    trained, updates = half_model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert all(bool(jnp.all(jnp.isfinite(trained[name]))) for name in FEATURES)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves((variables, updates))} == {jnp.dtype(jnp.float32)}


def test_rejects_unknown_depth_and_norm():
    for model, message in [
        (ResNet(depth=20), "depth"),
        (ResNet(depth=18, norm="layer_norm"), "norm"),
        (ResNet(depth=18, freeze_at=6), "freeze_at"),
    ]:
        with pytest.raises(ValueError, match=message):
            abstract_variables(model)


def body_from_torchvision_import(state_dict, **import_options):
    """The ResNet variables that the importer (convert/torchvision.py) places at backbone/body."""
    from maskrcnn_jax.convert import from_torchvision

    imported = from_torchvision(state_dict, **import_options)
    return {collection: jax.tree_util.tree_map(jnp.asarray, tree["backbone"]["body"])
            for collection, tree in imported.items()}


# X101 runs at a reduced input (48 x 48: C5 is 2 x 2) to keep its compile and forward pass short; X50 at 36 x 52,
# with odd sizes at every stride as in the ResNet-18 test.
@pytest.mark.parametrize("name, groups, width_per_group, depth, size", [
    ("resnext50_32x4d", 32, 4, 50, (36, 52)),
    ("resnext101_32x8d", 32, 8, 101, (48, 48)),
])
def test_resnext_matches_torchvision(rng, name, groups, width_per_group, depth, size):
    """ResNeXt bodies (grouped 3x3 convs) equal torchvision's on random weights converted by the importer."""
    torch = pytest.importorskip("torch")
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(depth)
    reference = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d)
    randomize_norms(reference, seed=3)
    variables = body_from_torchvision_import(reference.state_dict())
    model = ResNet(depth=depth, groups=groups, width_per_group=width_per_group)
    assert count(variables) == count(abstract_variables(model))
    images = rng.standard_normal((1, 3, *size), dtype=np.float32)
    with torch.no_grad():
        expected = torchvision_features(reference, images)
    actual = jax.jit(model.apply)(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    for name in FEATURES:
        assert actual[name].shape == expected[name].shape
        assert relative_to_max_error(expected[name], actual[name]) < 1e-5, name


def test_resnext_widths():
    """X101-32x8d's res2 bottleneck: 32 groups x 8 = 256 channels in conv1 and the grouped conv2 (8 inputs per
    output), 256 out of conv3; res5: 2048 and 2048; plain ResNet keeps planes (64 .. 512)."""
    params = abstract_variables(ResNet(depth=101, groups=32, width_per_group=8), (1, 32, 32, 3))["params"]
    block = params["layer1"]["block_0"]
    assert block["conv1"]["kernel"].shape == (1, 1, 64, 256)
    assert block["conv2"]["kernel"].shape == (3, 3, 8, 256)
    assert block["conv3"]["kernel"].shape == (1, 1, 256, 256)
    assert params["layer4"]["block_0"]["conv2"]["kernel"].shape == (3, 3, 64, 2048)
    plain = abstract_variables(ResNet(depth=50), (1, 32, 32, 3))["params"]
    assert plain["layer1"]["block_0"]["conv2"]["kernel"].shape == (3, 3, 64, 64)


def test_num_stages_three_stops_at_c4():
    model = ResNet(depth=50, num_stages=3)
    features, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    assert sorted(features) == ["c2", "c3", "c4"] and features["c4"].shape == (1, 4, 4, 1024)
    assert sorted(variables["params"]) == ["conv1", "layer1", "layer2", "layer3"]
    # torchvision resnet50 minus fc (23,454,912 conv weights) minus layer4's 14,942,208
    assert count(variables["params"]) == 8_512_704


def test_res5_head_is_torchvisions_layer4(rng):
    """The C4 model's res5 head on RoI features equals torchvision resnet50's layer4 (stride 2 in its first block),
    with the ImageNet layer4 placed at res5 by the importer for a C4 model."""
    torch = pytest.importorskip("torch")
    from maskrcnn_jax.convert import from_torchvision
    from maskrcnn_jax.modeling.res5_head import Res5Head

    reference = torchvision_resnet(50, "frozen_bn")
    randomize_norms(reference, seed=4)
    imported = from_torchvision(reference.state_dict(), backbone_kind="c4")
    assert "layer4" not in imported["params"]["backbone"]["body"]
    variables = {collection: jax.tree_util.tree_map(jnp.asarray, tree["res5"]) for collection, tree in imported.items()}
    rois = rng.standard_normal((3, 1024, 14, 14), dtype=np.float32)
    with torch.no_grad():
        expected = reference.layer4(torch.from_numpy(rois)).numpy().transpose(0, 2, 3, 1)
    actual = jax.jit(Res5Head(depth=50).apply)(variables, jnp.asarray(rois.transpose(0, 2, 3, 1))[None])
    assert actual.shape == (1, 3, 7, 7, 2048)
    assert relative_to_max_error(expected, actual[0]) < 1e-5


def test_grouped_basic_blocks_are_rejected():
    with pytest.raises(ValueError, match="bottleneck"):
        abstract_variables(ResNet(depth=18, groups=32, width_per_group=4))
