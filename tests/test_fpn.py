"""FPN and the ResNet-FPN backbone: sizes and outputs against torchvision's resnet_fpn_backbone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.modeling import FPN, ResNetFPN, upsample_nearest
from maskrcnn_jax.modeling.fpn import nearest_source_indices

LEVELS = ("p2", "p3", "p4", "p5", "p6")


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def relative_to_max_error(expected, actual):
    expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    return np.abs(expected - actual).max() / np.abs(expected).max()


def torchvision_backbone_variables(state_dict):
    """Flax variables for a torchvision BackboneWithFPN (FrozenBN body) state dict, as documented in fpn.py."""
    variables = {"params": {}, "batch_stats": {}}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if parts[0] == "body":
            parts = parts[1:]
            if parts[0].startswith("layer"):
                parts = [parts[0], f"block_{parts[1]}"] + parts[2:]
                if parts[2] == "downsample":
                    parts = parts[:2] + [("downsample_conv", "downsample_bn")[int(parts[3])]] + parts[4:]
            path, leaf = ["body"] + parts[:-1], parts[-1]
        else:  # fpn.{inner,layer}_blocks.{i}.0.{weight,bias}
            kind = {"inner_blocks": "lateral", "layer_blocks": "output"}[parts[1]]
            path, leaf = ["fpn", f"{kind}{int(parts[2]) + 2}"], parts[-1]
        value = tensor.detach().numpy()
        if value.ndim == 4:
            leaf, value, collection = "kernel", value.transpose(2, 3, 1, 0), "params"
        elif path[0] == "fpn":
            collection = "params"
        else:
            collection = "batch_stats"
        node = variables[collection]
        for name in path:
            node = node.setdefault(name, {})
        node[leaf] = jnp.asarray(value)
    return variables


@pytest.mark.parametrize(
    "in_size,out_size",
    [((3, 5), (6, 10)), ((3, 5), (5, 9)), ((4, 7), (7, 13)), ((3, 5), (7, 11)), ((5, 7), (3, 4)), ((25, 37), (50, 74))],
)
def test_upsample_nearest_matches_torch_interpolate(rng, in_size, out_size):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 3, *in_size), dtype=np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=out_size, mode="nearest").numpy()
    actual = jax.jit(upsample_nearest, static_argnums=1)(jnp.asarray(x.transpose(0, 2, 3, 1)), out_size)
    np.testing.assert_array_equal(np.asarray(actual), expected.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("in_size", [1, 2, 3, 10, 25, 101])
def test_nearest_indices_for_fpn_sizes_are_halving(in_size):
    # The FPN's top-down sizes (2n, and 2n - 1 for odd maps) take source row floor(j / 2).
    for out_size in (2 * in_size, 2 * in_size - 1):
        np.testing.assert_array_equal(nearest_source_indices(in_size, out_size), np.arange(out_size) // 2)


def test_resnet50_fpn_sizes_match_torchvision():
    pytest.importorskip("torch")
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    reference = resnet_fpn_backbone(backbone_name="resnet50", weights=None)
    frozen_stats = sum(
        buffer.numel() for module in reference.modules() if isinstance(module, FrozenBatchNorm2d)
        for buffer in module.buffers()
    )
    weights = sum(v.numel() for v in reference.state_dict().values()) - frozen_stats

    variables = jax.eval_shape(lambda: ResNetFPN(depth=50).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    assert count(variables["params"]) == weights
    assert count(variables["batch_stats"]) == frozen_stats
    converted = jax.eval_shape(lambda: torchvision_backbone_variables(reference.state_dict()))
    assert jax.tree_util.tree_structure(converted) == jax.tree_util.tree_structure(variables)
    assert [x.shape for x in jax.tree_util.tree_leaves(converted)] == [
        x.shape for x in jax.tree_util.tree_leaves(variables)
    ]


def test_resnet50_fpn_sizes_without_torch():
    variables = jax.eval_shape(lambda: ResNetFPN(depth=50).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    # ResNet-50 body 23,454,912 + FPN 3,344,384 conv weights and biases; 26,560 FrozenBN channels x 4.
    assert count(variables["params"]["fpn"]) == 3_344_384
    assert count(variables["params"]) == 26_799_296
    assert count(variables["batch_stats"]) == 106_240


@pytest.fixture(scope="module")
def resnet50_fpn_pair():
    """torchvision's resnet_fpn_backbone (fixed seed, non-identity FrozenBN) and the same weights in Flax, with one
    jitted apply shared by the module's tests (jit caches one compile per image size)."""
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    reference = resnet_fpn_backbone(backbone_name="resnet50", weights=None).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buffer in reference.body.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0, generator=generator)
            elif name.endswith("weight"):
                buffer.uniform_(0.5, 1.5, generator=generator)
            else:
                buffer.normal_(0.0, 0.2, generator=generator)
        for name, parameter in reference.fpn.named_parameters():
            if name.endswith("bias"):  # torchvision initialises them to zero; make them count
                parameter.normal_(0.0, 0.2, generator=generator)
    variables = torchvision_backbone_variables(reference.state_dict())
    return reference, variables, jax.jit(ResNetFPN(depth=50).apply)


# 64x96 gives even maps down to a 1x2 P6; 100x148 gives odd maps at every level (25x37 ... 4x5, P6 2x3), which
# exercises the explicit padding, the odd-size nearest upsampling and the kernel-1 stride-2 pool.
@pytest.mark.parametrize("height,width", [(64, 96), (100, 148)])
def test_resnet50_fpn_matches_torchvision(rng, resnet50_fpn_pair, height, width):
    import torch

    reference, variables, apply = resnet50_fpn_pair
    images = rng.standard_normal((1, 3, height, width), dtype=np.float32)
    with torch.no_grad():
        expected = list(reference(torch.from_numpy(images)).values())
    actual = apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    assert list(actual) == list(LEVELS)
    for level, want in zip(LEVELS, expected):
        want = want.numpy().transpose(0, 2, 3, 1)
        assert actual[level].shape == want.shape, level
        assert relative_to_max_error(want, actual[level]) < 1e-5, level


def test_fpn_shapes_and_p6(rng):
    features = {
        f"c{level}": jnp.asarray(rng.standard_normal((2, 60 // 2**level + 1, 84 // 2**level + 1, 8 * level),
                                                     dtype=np.float32))
        for level in (2, 3, 4, 5)
    }
    fpn = FPN(channels=16)
    variables = jax.jit(fpn.init)(jax.random.key(0), features)
    outputs = jax.jit(fpn.apply)(variables, features)
    assert list(outputs) == list(LEVELS)
    for level in (2, 3, 4, 5):
        assert outputs[f"p{level}"].shape == (*features[f"c{level}"].shape[:3], 16)
    np.testing.assert_array_equal(outputs["p6"], outputs["p5"][:, ::2, ::2])
    with pytest.raises(ValueError, match="contiguous"):
        jax.eval_shape(fpn.apply, variables, {name: features[name] for name in ("c2", "c3", "c5")})


def test_fpn_group_norm(rng):
    features = {f"c{level}": jnp.asarray(rng.standard_normal((2, 64 // 2**level, 64 // 2**level, 16),
                                                             dtype=np.float32) * 3.0 + 1.0)
                for level in (2, 3, 4, 5)}
    fpn = FPN(channels=64, norm="gn")
    variables = jax.jit(fpn.init)(jax.random.key(0), features)
    params = variables["params"]
    assert set(params["lateral2"]) == {"kernel"} and set(params["lateral2_norm"]) == {"weight", "bias"}
    outputs = jax.jit(fpn.apply)(variables, features)
    # With the initial weight 1 and bias 0 each sample's 32 groups come out with mean 0 and variance 1.
    for level in ("p2", "p3", "p4", "p5"):
        grouped = np.asarray(outputs[level]).reshape(2, -1, 32, 2)
        np.testing.assert_allclose(grouped.mean(axis=(1, 3)), 0.0, atol=1e-4)
        np.testing.assert_allclose(grouped.var(axis=(1, 3)), 1.0, rtol=1e-3)
    with pytest.raises(ValueError, match="norm"):
        jax.eval_shape(FPN(norm="bn").init, jax.random.key(0), features)


def test_fpn_bfloat16_compute_keeps_float32_params(rng):
    features = {f"c{level}": jnp.asarray(rng.standard_normal((1, 64 // 2**level, 96 // 2**level, 8 * level),
                                                             dtype=np.float32))
                for level in (2, 3, 4, 5)}
    variables = jax.jit(FPN(channels=32).init)(jax.random.key(0), features)
    full = jax.jit(FPN(channels=32).apply)(variables, features)
    half = jax.jit(FPN(channels=32, dtype=jnp.bfloat16).apply)(variables, features)
    for level in LEVELS:
        assert half[level].dtype == jnp.bfloat16
        assert relative_to_max_error(full[level], half[level].astype(jnp.float32)) < 2e-2
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
