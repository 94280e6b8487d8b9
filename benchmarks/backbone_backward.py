"""Where our train step loses to torchvision's on a CPU: the ResNet-50-FPN backward pass.

    .venv/bin/python benchmarks/backbone_backward.py

Times, at 800x1344 and batch 1 with FrozenBN: our backbone forward, our backbone forward + backward (gradient
of the sum of P2-P6 w.r.t. all parameters), the same with XLA's own convolution backward instead of
layers/conv.py's CPU one, torchvision's resnet_fpn_backbone forward + backward on the same input, and our
multi-level RoIAlign forward + backward at the train step's sizes (512 RoIs at 7x7, 128 at 14x14).
"""

import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from maskrcnn_jax import ops
from maskrcnn_jax.layers import conv
from maskrcnn_jax.layers.compile_options import compiler_options
from maskrcnn_jax.modeling import ResNetFPN

HEIGHT, WIDTH = 800, 1344


def steady(fn, *args):
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


@contextlib.contextmanager
def xla_conv_backward():
    """Functions traced inside use XLA's transpose rules for every conv (the layers before layers/conv.py)."""
    cpu_gradients = conv.cpu_gradients
    conv.cpu_gradients = lambda x, kernel, grad, *, strides, padding, in_conditional_branch: conv.xla_gradients(
        x, kernel, grad, strides=strides, padding=padding)
    try:
        yield
    finally:
        conv.cpu_gradients = cpu_gradients


def main():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, HEIGHT, WIDTH, 3)).astype(np.float32)
    model = ResNetFPN(depth=50)
    variables = jax.jit(model.init)(jax.random.key(0), image)
    params, stats = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def feature_sum(params, stats, image):
        return sum(jnp.sum(p) for p in jax.tree.leaves(model.apply({**stats, "params": params}, image)))

    options = compiler_options()
    forward = jax.jit(feature_sum, compiler_options=options)
    backward = jax.jit(jax.grad(feature_sum), compiler_options=options)
    print(f"ours backbone forward           {steady(forward, params, stats, image):6.2f} s")
    print(f"ours backbone forward+backward  {steady(backward, params, stats, image):6.2f} s")
    # What layers/compile_options.py changes: XLA's default options put the convolutions in YNNPACK.
    print(f"  the same two, XLA's defaults  {steady(jax.jit(feature_sum), params, stats, image):6.2f} s, "
          f"{steady(jax.jit(jax.grad(feature_sum)), params, stats, image):6.2f} s")
    with xla_conv_backward():
        seconds = steady(jax.jit(jax.grad(feature_sum), compiler_options=options), params, stats, image)
    print(f"  the same, XLA's conv backward {seconds:6.2f} s")

    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=5)
    image_t = torch.from_numpy(image.transpose(0, 3, 1, 2))

    def torch_step():
        sum(p.sum() for p in backbone(image_t).values()).backward()

    torch_step()
    start = time.perf_counter()
    torch_step()
    print(f"torchvision backbone fwd+bwd    {time.perf_counter() - start:6.2f} s")

    levels = [jnp.asarray(rng.standard_normal((1, HEIGHT // s, WIDTH // s, 256)).astype(np.float32))
              for s in (4, 8, 16, 32)]
    xy = rng.uniform(0, 700, (512, 2))
    wh = rng.uniform(8, 400, (512, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + wh], 1)[None].astype(np.float32))
    for size, count in ((7, 512), (14, 128)):
        grad = jax.jit(jax.grad(lambda f: jnp.sum(
            ops.multilevel_roi_align(f, boxes[:, :count], size, (4, 8, 16, 32), 2, False) ** 2)))
        print(f"ours roi_align {size}x{size} fwd+bwd ({count})  {steady(grad, levels):6.2f} s")


if __name__ == "__main__":
    main()
