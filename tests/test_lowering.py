"""The sharded train step and the predict function, exported for CUDA and TPU on 8 abstract devices.

Nothing here needs an accelerator. `jax.export` lowers (it does not compile) `train.jit_train_step`'s function and
`MaskRCNN.predict` under `jit` against `jax.sharding.AbstractMesh((8,), ('data',))`, which has axis names and sizes
but no devices: batches `P('data')`, the state replicated and donated, as engine/parallel.py shards them. The model
is configs/coco_r50_fpn_1x.py's R50-FPN at its own shapes (1344 x 1344 canvas, 100 instances, 112 x 112 masks,
global batch 16 for training and 8 for prediction). Each export takes about 10 s on a CPU.

What every exported module must satisfy:

- No host callback, host transfer or side effect: the exports carry no effects, and the modules hold no
  `custom_call` (a Python callback lowers to one; `jax.export` refuses targets without a stability guarantee),
  no send / recv / infeed / outfeed and nothing marked `has_side_effect`. The step never syncs with the host.
- No float64: no f64 type at all in the package's normal (x64 off) mode, and with `jax.enable_x64` no f64 array:
  what remains there are rank-0 scalars (Python constants such as `jnp.where(m, x, 0.0)`'s 0.0, and the learning
  rate schedule's gamma ** k), converted to float32 where they meet an array.
- The train step's state is donated (`tf.aliasing_output`, or `jax.buffer_donor` where XLA may pick the output),
  every state leaf and no batch field; the batch is split over 'data', the state replicated, 8 partitions.
- XLA's own gradients (the criterion for "no CPU-only backward leaks onto an accelerator"). layers/ and ops/ hold
  custom VJPs whose backward exists for XLA's CPU backend (conv.py's tap matmuls and phase convolutions,
  pooling.py's strided spreads); `lax.platform_dependent` must keep them on the CPU. So the train step's module must
  hold exactly the same StableHLO ops, counted by name, as the same step with each of those custom VJPs replaced by
  a plain differentiable function (PLAIN_REFERENCES), whose gradient is JAX's own transpose rule. Not counted
  (NOT_COUNTED): `stablehlo.case` and its `stablehlo.return`s, since `platform_dependent` lowers to a case whose
  branch index is a constant on one platform, and `stablehlo.broadcast_in_dim`, which only materialises a value in a
  new shape (lowering rules wrap constants in no-op ones, reduce_window's max its init value); XLA folds all three.
  Every custom VJP in layers/ and ops/ must be listed, either in PLAIN_REFERENCES or in EVERY_PLATFORM with the
  reason it runs everywhere. This comparison uses the COCO model with `backbone.freeze_at=0`: the COCO recipe
  freezes the stem and res2, whose backward (the stem's max-pool included) is then never traced.
"""

import collections
import functools
import importlib
import pathlib
import pkgutil
import re
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.sharding import AbstractMesh

from maskrcnn_jax import config as config_lib
from maskrcnn_jax import train
from maskrcnn_jax.engine import checkpointing, optim, parallel
from maskrcnn_jax.modeling.mask_rcnn import build_model

PLATFORMS = ("cuda", "tpu")
NUM_DEVICES = 8
COCO_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "coco_r50_fpn_1x.py"


def _plain_max_pool(x, window, strides, padding):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *padding, (0, 0)))


def _plain_conv2d(x, kernel, strides, padding, in_conditional_branch):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _plain_conv2d_transpose(y, kernel, strides, padding, input_hw, in_conditional_branch):
    x = jnp.zeros((y.shape[0], *input_hw, kernel.shape[2]), y.dtype)
    return jax.vjp(lambda x: _plain_conv2d(x, kernel, strides, padding, in_conditional_branch), x)[1](y)[0]


def _plain_references():
    """(module, name) of each CPU-speed custom VJP -> a plain differentiable function with its signature."""
    return {
        ("maskrcnn_jax.layers.conv", "conv2d"): _plain_conv2d,
        ("maskrcnn_jax.layers.conv", "conv2d_transpose"): _plain_conv2d_transpose,
        ("maskrcnn_jax.layers.pooling", "max_pool"): _plain_max_pool,
    }


# Custom VJPs that run on every platform, and why.
EVERY_PLATFORM = {
    ("maskrcnn_jax.ops.roi_pool", "_pool_image"): "RoIPool's gradient goes to each bin's argmax cell by definition",
    ("maskrcnn_jax.ops.roi_align", "_max_of_samples"): (
        "roi_reduce='max' (an ablation, not on the default path): the materialised first argmax makes an exact tie "
        "send a bin's cotangent once, which autodiff of the select chain does not guarantee"),
    ("maskrcnn_jax.ops.roi_align", "_weighted_gather"): (
        "its backward is the scatter-adds XLA's own transpose emits (one per bilinear term), chained into one buffer "
        "instead of one zero-filled buffer per term, summed. Not a CPU-only algorithm; whether the chain is also no "
        "slower on a GPU is the 'XLA's transpose' row of benchmarks/accelerator.py. A platform_dependent inside the "
        "per-image vmap changes the compiled CPU program, so switching needs more than a one-line dispatch"),
    ("maskrcnn_jax.layers.norm", "group_norm"): (
        "GroupNorm's closed-form backward (one reduction and one multiply-add pass): the same arithmetic as autodiff's "
        "in fewer passes over the activations, not a CPU-specific algorithm"),
    ("maskrcnn_jax.layers.activation", "bit_mask_relu"): (
        "autodiff's exact gradient from packed sign bits instead of a kept float map: a memory saving for any "
        "backend whose fusion recomputes the ReLU's input from the conv output, not a CPU-specific algorithm"),
}

# Ops that lower a platform_dependent choice or reshape a value, not computation (see the module docstring).
NOT_COUNTED = {"stablehlo.case", "stablehlo.return", "stablehlo.broadcast_in_dim"}


# -- exporting ----------------------------------------------------------------------------------------------------


def _coco_config(**model_overrides):
    config = config_lib.load(COCO_CONFIG)
    for key, value in model_overrides.items():
        section, name = key.split(".")
        config.model[section][name] = value
    return config


def _abstract_state(config, model, mesh):
    state = jax.eval_shape(lambda: checkpointing.create_train_state(config, model)[0])
    # The optimizer is built outside eval_shape: the learning-rate schedule closes over arrays made when it is built.
    tx = optim.make_optimizer(config, state.params)
    replicated = parallel.replicated(mesh)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    return state, tx


def _batch_specs(config, batch_size, mesh, keys=train.MODEL_INPUTS, image_dtype=None):
    """The pipeline's training batch contract (data/pipeline.py) at the config's shapes, sharded over 'data': uint8
    images, as training sends them (evaluation and serving send float32)."""
    d = config.data
    height, width = d.canvas_size
    g, m = d.max_instances, d.mask_size
    shapes = {
        "image": ((batch_size, height, width, 3), jnp.dtype(image_dtype or d.train_image_dtype)),
        "image_size": ((batch_size, 2), jnp.int32),
        "gt_boxes": ((batch_size, g, 4), jnp.float32),
        "gt_classes": ((batch_size, g), jnp.int32),
        "gt_is_crowd": ((batch_size, g), jnp.bool_),
        "gt_valid": ((batch_size, g), jnp.bool_),
        "gt_masks": ((batch_size, g, m, m), jnp.dtype(d.mask_dtype)),
    }
    sharding = parallel.batch_sharded(mesh)
    return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=sharding) for k in keys}


def _mesh():
    return AbstractMesh((NUM_DEVICES,), (parallel.DATA_AXIS,))


def export_train_step(platform, config):
    mesh = _mesh()
    model = build_model(config.model)
    state, tx = _abstract_state(config, model, mesh)
    batch = _batch_specs(config, config.train.batch_size, mesh)
    assert set(batch) == set(train.MODEL_INPUTS)
    step = train.jit_train_step(model, tx, config, mesh)
    return jax.export.export(step, platforms=(platform,))(state, batch)


def export_predict(platform, config):
    """MaskRCNN.predict under jit with train.make_predict_fn's shardings."""
    mesh = _mesh()
    model = build_model(config.model)
    state, _ = _abstract_state(config, model, mesh)
    batch = _batch_specs(config, config.eval.batch_size, mesh, keys=("image", "image_size"), image_dtype="float32")
    sharded = parallel.batch_sharded(mesh)
    network = jax.jit(lambda variables, images, sizes: model.apply(variables, images, sizes, method=model.predict),
                      in_shardings=(parallel.replicated(mesh), sharded, sharded), out_shardings=sharded)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return jax.export.export(network, platforms=(platform,))(variables, batch["image"], batch["image_size"])


@functools.cache
def exported(kind, platform):
    """(jax.export.Exported, its module's text), one export per (kind, platform) for the whole module."""
    if kind == "train":
        exp = export_train_step(platform, _coco_config())
    elif kind == "predict":
        exp = export_predict(platform, _coco_config())
    elif kind == "train_x64":
        with jax.enable_x64(True):
            exp = export_train_step(platform, _coco_config())
    else:
        raise ValueError(kind)
    return exp, exp.mlir_module()


def _custom_vjps():
    """(module, name) -> object for every custom VJP / JVP defined or bound at the top level of layers/ and ops/."""
    found = {}
    for package_name in ("maskrcnn_jax.layers", "maskrcnn_jax.ops"):
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package_name}.{info.name}")
            for name, value in vars(module).items():
                if isinstance(value, (jax.custom_vjp, jax.custom_jvp)) and not any(v is value for v in found.values()):
                    found[(module.__name__, name)] = value
    return found


def _with_plain_gradients(keys):
    """A context in which the custom VJPs `keys` are their plain references wherever the package binds them."""
    references = _plain_references()
    patch = pytest.MonkeyPatch()
    for module_name, name in keys:
        original = getattr(importlib.import_module(module_name), name)
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("maskrcnn_jax"):
                for attribute, value in list(vars(module).items()):
                    if value is original:
                        patch.setattr(module, attribute, references[(module_name, name)])
    return patch


@functools.cache
def train_op_counts(platform, plain):
    """Op counts of the train step of the COCO model with every backbone stage trained; with `plain`, the
    CPU-speed custom VJPs (PLAIN_REFERENCES) are replaced by their plain references."""
    patch = _with_plain_gradients(_plain_references() if plain else ())
    try:
        text = export_train_step(platform, _coco_config(**{"backbone.freeze_at": 0})).mlir_module()
    finally:
        patch.undo()
    return op_counts(text)


# -- reading a module ---------------------------------------------------------------------------------------------


def op_counts(text):
    """StableHLO / CHLO / SDY / func ops by name, in both the pretty (`stablehlo.add`) and generic form."""
    return collections.Counter(
        re.findall(r'^\s*(?:%[\w#:]+(?:, %[\w#:]+)* = )?"?((?:stablehlo|chlo|mhlo|sdy|func)\.\w+)', text, re.M))


def _closing(text, start):
    """Index of the bracket closing text[start] (one of ( [ { <), skipping quoted strings."""
    pairs = {"(": ")", "[": "]", "{": "}", "<": ">"}
    stack, i = [], start
    while i < len(text):
        c = text[i]
        if c == '"':
            i = text.index('"', i + 1)
            while text[i - 1] == "\\":
                i = text.index('"', i + 1)
        elif c in pairs and not (c == "<" and text[i - 1] == "-"):
            stack.append(pairs[c])
        elif stack and c == stack[-1] and not (c == ">" and text[i - 1] == "-"):
            stack.pop()
            if not stack:
                return i
        i += 1
    raise ValueError("unbalanced")


def _split_top_level(text):
    """Split a comma-separated list at commas outside brackets and strings."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c == '"':
            i = text.index('"', i + 1)
        elif c in "([{<" and not (c == "<" and text[i - 1] == "-"):
            depth += 1
        elif c in ")]}>" and not (c == ">" and text[i - 1] == "-"):
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
        i += 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def main_signature(text):
    """[(argument name, its text)], [(result name, its text)] of the module's public main function."""
    head = text.index("func.func public @main(")
    open_args = head + len("func.func public @main")
    close_args = _closing(text, open_args)
    args = []
    for part in _split_top_level(text[open_args + 1 : close_args]):
        name = re.search(r'loc\("([^"]*)"\)\s*$', part)
        args.append((name.group(1) if name else part.split(":")[0], part))
    rest = text[close_args + 1 :]
    open_results = close_args + 1 + rest.index("(")
    results = []
    for part in _split_top_level(text[open_results + 1 : _closing(text, open_results)]):
        name = re.search(r'jax\.result_info = "([^"]*)"', part)
        results.append((name.group(1) if name else "?", part))
    return args, results


def _sharding(part):
    match = re.search(r"sdy\.sharding = #sdy\.sharding<@mesh, (\[.*?\])>", part)
    assert match, f"no sharding on {part[:200]}"
    return match.group(1)


# -- the tests ----------------------------------------------------------------------------------------------------

EXPORTS = [(kind, platform) for kind in ("train", "predict") for platform in PLATFORMS]


@pytest.mark.parametrize("kind, platform", EXPORTS)
def test_no_host_callbacks_or_side_effects(kind, platform):
    exp, text = exported(kind, platform)
    assert exp.platforms == (platform,)
    assert exp.ordered_effects == () and exp.unordered_effects == ()
    assert exp.disabled_safety_checks == ()
    counts = op_counts(text)
    host_ops = {op: n for op, n in counts.items() if op.split(".")[-1] in
                ("custom_call", "send", "recv", "infeed", "outfeed", "after_all", "create_token")}
    assert not host_ops, f"{kind} for {platform} talks to the host: {host_ops}"
    assert "has_side_effect" not in text
    assert "callback" not in " ".join(re.findall(r"custom_call\s*@?\"?[\w.]+", text))


@pytest.mark.parametrize("kind, platform", EXPORTS)
def test_no_float64(kind, platform):
    assert not jax.config.jax_enable_x64, "something in the package turned on jax_enable_x64"
    _, text = exported(kind, platform)
    found = [text[max(0, m.start() - 60) : m.end()] for m in re.finditer(r"[<x]f64>", text)]
    assert not found, f"float64 in the {kind} step for {platform}: {found[:5]}"


def test_no_float64_arrays_even_with_x64():
    """With jax_enable_x64 on (a user's JAX_ENABLE_X64=1), Python scalars become f64 constants, but no array may."""
    _, text = exported("train_x64", "cuda")
    arrays = sorted(set(re.findall(r"(?:tensor<(?:[\d?]+x)+(?:f64|complex<f64>)>)", text)))
    assert not arrays, f"float64 arrays in the train step under x64: {arrays[:10]}"
    assert "f64>" in text  # the scalars are there: the check above looked at a module lowered with x64 on


@pytest.mark.parametrize("platform", PLATFORMS)
def test_train_step_is_sharded_and_donates_the_state(platform):
    exp, text = exported("train", platform)
    assert exp.nr_devices == NUM_DEVICES
    assert f'sdy.mesh @mesh = <["{parallel.DATA_AXIS}"={NUM_DEVICES}]>' in text
    assert f"mhlo.num_partitions = {NUM_DEVICES} : i32" in text
    args, results = main_signature(text)
    num_state = exp.in_tree.children()[0].children()[0].num_leaves
    assert len(args) == len(exp.in_avals)  # no argument was dropped as unused
    state_args = [(n, p) for n, p in args if n.startswith("state")]
    batch_args = [(n, p) for n, p in args if n.startswith("batch")]
    assert len(state_args) == num_state and len(batch_args) == len(train.MODEL_INPUTS)
    donated = lambda part: "tf.aliasing_output" in part or "jax.buffer_donor" in part
    not_donated = [n for n, p in state_args if not donated(p)]
    assert not not_donated, f"state arguments not donated: {not_donated[:5]}"
    assert not [n for n, p in batch_args if donated(p)]
    for name, part in batch_args:
        assert _sharding(part).startswith(f'[{{"{parallel.DATA_AXIS}"}}'), name
    for name, part in state_args:
        assert parallel.DATA_AXIS not in _sharding(part), name
    for name, part in results:
        assert parallel.DATA_AXIS not in _sharding(part), name


@pytest.mark.parametrize("platform", PLATFORMS)
def test_predict_is_sharded_over_the_batch(platform):
    exp, text = exported("predict", platform)
    assert exp.nr_devices == NUM_DEVICES
    args, results = main_signature(text)
    assert len(args) == len(exp.in_avals)
    for name, part in args:
        sharded = _sharding(part).startswith(f'[{{"{parallel.DATA_AXIS}"}}')
        assert sharded == (not name.startswith("variables")), name
    assert {name for name, _ in results} >= {"result['boxes']", "result['masks']", "result['valid']"}
    for name, part in results:
        assert _sharding(part).startswith(f'[{{"{parallel.DATA_AXIS}"}}'), name


def test_every_custom_vjp_is_accounted_for():
    found = set(_custom_vjps())
    unlisted = found - set(_plain_references()) - set(EVERY_PLATFORM)
    assert not unlisted, (f"custom VJPs {sorted(unlisted)}: add a plain reference to _plain_references (a backend "
                          "speed path, which must be dispatched with lax.platform_dependent) or to EVERY_PLATFORM")
    assert set(_plain_references()) | set(EVERY_PLATFORM) <= found


def _difference(got, expected):
    return {op: (got[op], expected[op]) for op in sorted(set(got) | set(expected))
            if op not in NOT_COUNTED and got[op] != expected[op]}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_backward_is_xla_own(platform):
    """conv.py's and pooling.py's CPU backward stay off the accelerators: the same ops as with JAX's own gradients."""
    got, expected = train_op_counts(platform, False), train_op_counts(platform, True)
    difference = _difference(got, expected)
    assert not difference, f"ops (ours, plain lax gradients) that differ for {platform}: {difference}"
    # What the comparison covers: every convolution's backward, and the stem max-pool's (XLA's select-and-scatter).
    assert expected["stablehlo.convolution"] > 0 and expected["stablehlo.select_and_scatter"] > 0
