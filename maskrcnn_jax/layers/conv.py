"""A 2-D convolution whose backward pass is fast on XLA's CPU backend; a drop-in for ``lax.conv_general_dilated``.

XLA's CPU backend lowers both gradients of an NHWC convolution to convolutions of unusual shape: the weight
gradient to one whose window is the whole output map, the input gradient to one with a reversed, in/out-swapped
kernel (and input dilation for strided layers). Under XLA's default options YNNPACK takes most of them at the top
level of a program, 2-9x slower than the forward pass; with layers/compile_options.py's, which keep convolutions
on XLA's own runtime, the top-level k x k weight gradient is fast (faster than matmuls per tap: ResNet-18's on the
demo's batch of 4 at 192 px, 84 against 170 ms), but the 1x1 ones and strided input gradients are still slow.
Inside a ``lax.cond``/``switch`` branch (the mask and keypoint heads run in one, modeling/mask_rcnn.py) XLA falls
back to a path some 500x slower for any weight gradient (a 3x3 256->256 on 16 RoIs of 14x14: 7.6 s against 14 ms
at the top level). Here a custom VJP computes, on CPU only:

  - the weight gradient of a 1x1 conv as one matmul of the strided input with the output gradient;
  - the weight gradient of a k x k conv by XLA's own transpose at the top level, and, for convs marked
    ``in_conditional_branch``, as one matmul per kernel tap, each reading a shifted strided window of the padded
    input, contracted with the output gradient over batch and output pixels;
  - the input gradient of a 1x1 conv as a matmul with the transposed kernel, spread back onto the stride grid;
  - the input gradient of a k x k conv as forward convolutions with a reversed, in/out-swapped kernel: one for
    stride 1, and one per stride phase (sub-kernel of every stride-th tap) for strided layers, interleaved.

``conv2d_transpose`` (PyTorch's ConvTranspose2d, the keypoint head's deconv) is built from the same pieces.

Every other backend uses XLA's own transpose rules (on GPU and TPU the library convolution backward is the fast
path). The forward pass is ``lax.conv_general_dilated`` itself. Arguments the fast path does not cover (other
layouts, dilation, feature groups, an explicit precision or output type) go straight to
``lax.conv_general_dilated``, so passing this function as flax's ``nn.Conv(conv_general_dilated=...)`` keeps the
module's parameters, names and numerics unchanged.

Being a ``jax.custom_vjp``, the fast path supports reverse-mode differentiation (``grad``, ``vjp``) and ``vmap``
but not forward mode (``jvp``, ``jacfwd``).
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")

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
    in_conditional_branch=False,
):
    """``lax.conv_general_dilated`` with a CPU-friendly gradient for plain NHWC/HWIO 2-D convolutions.
    in_conditional_branch: the conv is traced inside a lax.cond/switch branch (see the module docstring)."""
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
    return conv2d(lhs, rhs, tuple(window_strides), tuple((int(lo), int(hi)) for lo, hi in padding),
                  bool(in_conditional_branch))


def _plain_conv2d(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x, kernel, strides, padding, in_conditional_branch):
    """NHWC input, HWIO kernel, ``strides`` (sh, sw), explicit ``padding`` ((top, bottom), (left, right))."""
    return _plain_conv2d(x, kernel, strides, padding)


def _conv2d_forward(x, kernel, strides, padding, in_conditional_branch):
    return conv2d(x, kernel, strides, padding, in_conditional_branch), (x, kernel)


def _conv2d_backward(strides, padding, in_conditional_branch, residuals, grad):
    x, kernel = residuals
    return lax.platform_dependent(
        x,
        kernel,
        grad,
        cpu=functools.partial(cpu_gradients, strides=strides, padding=padding,
                              in_conditional_branch=in_conditional_branch),
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
    # each tap's window is then an unstrided block of one phase, which a loop can cut with dynamic_slice. Channels
    # go first, so that each window is a [cin, pixels] matrix: XLA's CPU matmul inside a loop runs that
    # untransposed form 20-30% faster than contracting the pixels of a [pixels, cin] one.
    extra_h, extra_w = -height % sh, -width % sw
    padded = lax.pad(
        x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, bottom + extra_h, 0), (left, right + extra_w, 0), (0, 0, 0))
    )
    phases = padded.reshape(batch, (height + extra_h) // sh, sh, (width + extra_w) // sw, sw, cin)
    phases = phases.transpose(2, 4, 5, 0, 1, 3)

    # The loop keeps one window alive at a time; unrolled, XLA cuts all kh * kw windows (each the size of the
    # input) before the first matmul.
    def tap(_, index):
        i, j = index // kw, index % kw
        window = lax.dynamic_slice(phases, (i % sh, j % sw, 0, 0, i // sh, j // sw), (1, 1, cin, batch, out_h, out_w))
        return None, jnp.dot(window.reshape(cin, pixels), grad_rows, preferred_element_type=jnp.float32)

    _, taps = lax.scan(tap, None, jnp.arange(kh * kw))
    return taps.reshape(kh, kw, cin, cout)


def _phase_input_grad(kernel, grad, input_hw, strides, padding):
    """Input gradient of a k x k conv as forward convolutions of the output gradient.

    Padded input pixel q = s * m + a is read by output pixel r through tap i = q - s * r, so i = a + s * t and
    d(padded)[s * m + a] = sum_t grad[m - t] @ kernel[a + s * t].T: for each phase a, a stride-1 correlation of
    the output gradient with the phase's taps reversed. Stride 1 has one phase and needs no interleaving.
    """
    kh, kw, cin, cout = kernel.shape
    batch, out_h, out_w, _ = grad.shape
    (sh, sw), ((top, bottom), (left, right)) = strides, padding
    height, width = input_hw
    if (sh, sw) == (1, 1):
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        pads = ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
        return _plain_conv2d(grad, flipped, (1, 1), pads)
    # Phase rows m cover the padded input: m < ceil(padded / s).
    rows, cols = -(-(height + top + bottom) // sh), -(-(width + left + right) // sw)
    phase_rows = []
    for a in range(sh):
        phase_cols = []
        for b in range(sw):
            taps = kernel[a::sh, b::sw]
            th, tw = taps.shape[:2]
            if th == 0 or tw == 0:
                phase_cols.append(jnp.zeros((batch, rows, cols, cin), grad.dtype))
                continue
            sub_kernel = jnp.flip(taps, (0, 1)).transpose(0, 1, 3, 2)
            pads = ((th - 1, rows - out_h), (tw - 1, cols - out_w))
            phase_cols.append(_plain_conv2d(grad, sub_kernel, (1, 1), pads))
        phase_rows.append(jnp.stack(phase_cols, axis=3))
    padded = jnp.stack(phase_rows, axis=2).reshape(batch, rows * sh, cols * sw, cin)
    # Input pixel j is padded pixel j + top; negative edges crop, and pixels the padding cropped get zeros.
    return lax.pad(
        padded,
        jnp.zeros((), grad.dtype),
        ((0, 0, 0), (-top, height + top - rows * sh, 0), (-left, width + left - cols * sw, 0), (0, 0, 0)),
    )


def _xla_kernel_grad(x, kernel, grad, strides, padding):
    _, pullback = jax.vjp(lambda kernel: _plain_conv2d(x, kernel, strides, padding), kernel)
    return pullback(grad)[0]


def _cpu_kernel_grad(x, kernel, grad, strides, padding, in_conditional_branch):
    """Kernel gradient of conv2d(x, kernel) given its output gradient: XLA's own for k x k kernels at the top
    level, matmuls otherwise."""
    kh, kw, _, _ = kernel.shape
    if (kh, kw) != (1, 1) and not in_conditional_branch:
        return _xla_kernel_grad(x, kernel, grad, strides, padding)
    return _tap_matmul_kernel_grad(x, grad, (kh, kw), strides, padding).astype(kernel.dtype)


def cpu_gradients(x, kernel, grad, *, strides, padding, in_conditional_branch=False):
    """(input gradient, kernel gradient); inside a conditional branch from matmuls and forward convolutions only."""
    kh, kw, _, _ = kernel.shape
    _, out_h, out_w, _ = grad.shape
    kernel_grad = _cpu_kernel_grad(x, kernel, grad, strides, padding, in_conditional_branch)
    if (kh, kw) != (1, 1):
        return _phase_input_grad(kernel, grad, x.shape[1:3], strides, padding).astype(x.dtype), kernel_grad

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d_transpose(y, kernel, strides, padding, input_hw, in_conditional_branch):
    """The adjoint of ``conv2d(x, kernel, strides, padding)`` in x, for x of spatial size input_hw:
    y [B, h, w, cout] -> [B, *input_hw, cin]. PyTorch's ConvTranspose2d is this with its weight as the kernel.

    Its gradients are the forward conv of the output gradient (for y) and conv2d's kernel gradient with the roles
    of input and output gradient swapped (for the kernel), so that on the CPU neither is one of XLA's transposed
    convolutions: the keypoint head's 4x4 stride-2 one, forward and backward on 16 RoIs of 14x14x512 inside the
    RoI buckets' switch, took 1.2 s as ``lax.conv_general_dilated`` with input dilation.
    """
    return lax.platform_dependent(
        y,
        kernel,
        cpu=lambda y, kernel: _phase_input_grad(kernel, y, input_hw, strides, padding),
        default=lambda y, kernel: _xla_input_grad(y, kernel, input_hw, strides, padding),
    )


def _xla_input_grad(grad, kernel, input_hw, strides, padding):
    batch, _, _, _ = grad.shape
    x = jnp.zeros((batch, *input_hw, kernel.shape[2]), grad.dtype)
    _, pullback = jax.vjp(lambda x: _plain_conv2d(x, kernel, strides, padding), x)
    return pullback(grad)[0]


def _conv2d_transpose_forward(y, kernel, strides, padding, input_hw, in_conditional_branch):
    return conv2d_transpose(y, kernel, strides, padding, input_hw, in_conditional_branch), (y, kernel)


def _conv2d_transpose_backward(strides, padding, input_hw, in_conditional_branch, residuals, grad):
    y, kernel = residuals
    y_grad = _plain_conv2d(grad, kernel, strides, padding)
    kernel_grad = lax.platform_dependent(
        grad,
        kernel,
        y,
        cpu=functools.partial(_cpu_kernel_grad, strides=strides, padding=padding,
                              in_conditional_branch=in_conditional_branch),
        default=functools.partial(_xla_kernel_grad, strides=strides, padding=padding),
    )
    return y_grad, kernel_grad


conv2d_transpose.defvjp(_conv2d_transpose_forward, _conv2d_transpose_backward)


class Conv(nn.Conv):
    """flax's nn.Conv with this module's conv_general_dilated bound once: the same parameters, names and forward
    numerics, and the CPU-friendly backward wherever it is traced. Every convolution of modeling/ is this one or
    BranchConv."""

    conv_general_dilated: Callable[..., Any] | None = conv_general_dilated


class BranchConv(Conv):
    """Conv for layers traced inside a lax.cond/switch branch (the heads of modeling/mask_rcnn.py's RoI buckets):
    its CPU weight gradient avoids XLA's convolutions, which are some 500x slower there."""

    conv_general_dilated: Callable[..., Any] | None = functools.partial(conv_general_dilated,
                                                                        in_conditional_branch=True)
