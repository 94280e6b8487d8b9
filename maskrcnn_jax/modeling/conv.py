"""A 2-D convolution whose backward pass is fast on XLA's CPU backend; a drop-in for ``lax.conv_general_dilated``.

XLA's CPU backend lowers the weight gradient of an NHWC convolution to a convolution whose window is the whole
output feature map (a YNNPACK fusion in jax 0.10). On a 2-core x86 machine that ran 2-9x slower than the forward
pass for the 1x1 convs of a ResNet-50 and 6x for the largest 3x3 convs of the FPN and RPN (3x3 256->256 at
200x336: 4.9 s for the weight gradient against 0.8 s forward). Here a custom VJP computes, on CPU only:

  - the weight gradient of a 1x1 conv as one matmul of the (strided) input with the output gradient, and of a
    larger kernel as one matmul per kernel tap, each reading a shifted strided window of the padded input, when
    the layer is large enough for XLA's formulation to be slow (see ``TAP_MATMUL_MIN_MACS``);
  - the input gradient of a 1x1 conv as a matmul with the transposed kernel, spread back onto the stride grid.

Everything else, and every other backend, uses XLA's own transpose rules (on GPU and TPU the library convolution
backward is the fast path). The forward pass is ``lax.conv_general_dilated`` itself. Arguments the fast path does
not cover (other layouts, dilation, feature groups, an explicit precision or output type) go straight to
``lax.conv_general_dilated``, so passing this function as flax's ``nn.Conv(conv_general_dilated=...)`` keeps the
module's parameters, names and numerics unchanged.

Being a ``jax.custom_vjp``, the fast path supports reverse-mode differentiation (``grad``, ``vjp``) and ``vmap``
but not forward mode (``jvp``, ``jacfwd``).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")

# Below this many multiply-adds per kernel tap (batch * output pixels * in * out channels), XLA's own weight
# gradient of a k x k conv is as fast as the tap matmuls or faster (every 3x3 conv of a ResNet-50 at 800x1344 has
# 2.8e8); above it XLA's slows down sharply (3x3 256->256 at 100x168, 1.1e9 per tap: 2-3x slower than the
# matmuls; at 200x336, 4.4e9: 4-5x). Measured on a 2-core x86 machine; on another CPU the crossover may move.
TAP_MATMUL_MIN_MACS = 5e8


def _is_identity(values):
    return values is None or all(v == 1 for v in values)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """``lax.conv_general_dilated`` with a CPU-friendly gradient for plain NHWC/HWIO 2-D convolutions."""
    fast = (
        lhs.ndim == 4
        and rhs.ndim == 4
        and dimension_numbers is not None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
        and _is_identity(lhs_dilation)
        and _is_identity(rhs_dilation)
        and feature_group_count == 1
        and batch_group_count == 1
        and precision is None
        and preferred_element_type is None
    )
    if not fast:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    return conv2d(lhs, rhs, tuple(window_strides), tuple((int(lo), int(hi)) for lo, hi in padding))


def _plain_conv2d(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, strides, padding):
    """NHWC input, HWIO kernel, ``strides`` (sh, sw), explicit ``padding`` ((top, bottom), (left, right))."""
    return _plain_conv2d(x, kernel, strides, padding)


def _conv2d_forward(x, kernel, strides, padding):
    return conv2d(x, kernel, strides, padding), (x, kernel)


def _conv2d_backward(strides, padding, residuals, grad):
    x, kernel = residuals
    return lax.platform_dependent(
        x,
        kernel,
        grad,
        cpu=functools.partial(cpu_gradients, strides=strides, padding=padding),
        default=functools.partial(xla_gradients, strides=strides, padding=padding),
    )


conv2d.defvjp(_conv2d_forward, _conv2d_backward)


def xla_gradients(x, kernel, grad, *, strides, padding):
    """(input gradient, kernel gradient) by XLA's own transpose rules."""
    _, pullback = jax.vjp(lambda x, kernel: _plain_conv2d(x, kernel, strides, padding), x, kernel)
    return pullback(grad)


def _tap_matmul_kernel_grad(x, grad, kernel_size, strides, padding):
    """Kernel gradient [kh, kw, cin, cout]: for each tap, the input window that tap sees times the output gradient,
    contracted over batch and output pixels."""
    (kh, kw), (sh, sw) = kernel_size, strides
    batch, out_h, out_w, cout = grad.shape
    cin = x.shape[-1]
    pixels = batch * out_h * out_w
    (top, bottom), (left, right) = padding
    height, width = x.shape[1] + top + bottom, x.shape[2] + left + right
    grad_rows = grad.reshape(pixels, cout)

    def window_times_grad(window):
        return lax.dot_general(
            window.reshape(pixels, cin), grad_rows, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    if kh == kw == 1:
        padded = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
        window = lax.slice(padded, (0, 0, 0, 0), (batch, sh * (out_h - 1) + 1, sw * (out_w - 1) + 1, cin),
                           (1, sh, sw, 1))
        return window_times_grad(window).reshape(1, 1, cin, cout)

    # Pad to whole stride multiples and split into sh * sw phases, padded[:, a::sh, b::sw] (free for stride 1):
    # each tap's window is then an unstrided block of one phase, which a loop can cut with dynamic_slice.
    extra_h, extra_w = -height % sh, -width % sw
    padded = lax.pad(
        x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, bottom + extra_h, 0), (left, right + extra_w, 0), (0, 0, 0))
    )
    phases = padded.reshape(batch, (height + extra_h) // sh, sh, (width + extra_w) // sw, sw, cin)
    phases = phases.transpose(2, 4, 0, 1, 3, 5)

    # The loop keeps one window alive at a time; unrolled, XLA cuts all kh * kw windows (each the size of the
    # input) before the first matmul.
    def tap(_, index):
        i, j = index // kw, index % kw
        window = lax.dynamic_slice(phases, (i % sh, j % sw, 0, i // sh, j // sw, 0), (1, 1, batch, out_h, out_w, cin))
        return None, window_times_grad(window)

    _, taps = lax.scan(tap, None, jnp.arange(kh * kw))
    return taps.reshape(kh, kw, cin, cout)


def cpu_gradients(x, kernel, grad, *, strides, padding):
    """(input gradient, kernel gradient) with matmuls where XLA's CPU convolution backward is slow."""
    kh, kw, cin, cout = kernel.shape
    batch, out_h, out_w, _ = grad.shape
    one_by_one = kh == kw == 1
    if not one_by_one and batch * out_h * out_w * cin * cout < TAP_MATMUL_MIN_MACS:
        return xla_gradients(x, kernel, grad, strides=strides, padding=padding)

    kernel_grad = _tap_matmul_kernel_grad(x, grad, (kh, kw), strides, padding).astype(kernel.dtype)

    if not one_by_one:
        _, input_pullback = jax.vjp(lambda x: _plain_conv2d(x, kernel, strides, padding), x)
        return input_pullback(grad)[0], kernel_grad

    # 1x1: output pixel (r, c) reads padded input pixel (r * sh, c * sw); spread the matmul back onto that grid
    # with interior zeros and crop the padding (lax.pad takes negative edges as crops).
    spread = jnp.dot(grad, kernel[0, 0].T, preferred_element_type=jnp.float32).astype(x.dtype)
    _, height, width, _ = x.shape
    (top, _), (left, _) = padding
    input_grad = lax.pad(
        spread,
        jnp.zeros((), x.dtype),
        (
            (0, 0, 0),
            (-top, height + top - strides[0] * (out_h - 1) - 1, strides[0] - 1),
            (-left, width + left - strides[1] * (out_w - 1) - 1, strides[1] - 1),
            (0, 0, 0),
        ),
    )
    return input_grad, kernel_grad
