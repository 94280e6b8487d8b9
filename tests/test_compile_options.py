"""layers/compile_options.py: on the CPU, convolutions compile outside YNNPACK and dots inside it; options this
jaxlib rejects fall back to XLA's defaults."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from maskrcnn_jax.layers import compile_options


def conv_then_dot(x, kernel, weights):
    features = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.dot(features.reshape(-1, features.shape[-1]), weights)


def ynn_fusions(hlo_text):
    """The bodies of the compiled program's YNNPACK fusions, by the computation each calls."""
    called = re.findall(r"fusion\(.*custom_fusion_computation=%?([\w.\-]+)", hlo_text)
    called += re.findall(r'fusion\(.*calls=%?([\w.\-]+).*"__ynn_fusion"', hlo_text)
    bodies = {}
    for name in set(called):
        match = re.search(rf"^%?{re.escape(name)} .*?\{{\n(.*?)^\}}", hlo_text, re.M | re.S)
        bodies[name] = match.group(1) if match else ""
    return bodies


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((2, 16, 16, 32)), jnp.float32),
            jnp.asarray(rng.standard_normal((3, 3, 32, 32)), jnp.float32),
            jnp.asarray(rng.standard_normal((32, 8)), jnp.float32))


def test_cpu_convolutions_leave_ynnpack_and_dots_stay(inputs):
    options = compile_options.compiler_options()
    if not options:
        pytest.skip("this jaxlib does not know the option; the package compiles with XLA's defaults")
    jitted = jax.jit(conv_then_dot)
    ours = jitted.lower(*inputs).compile(compiler_options=options).as_text()
    # The convolution is a top-level op (jax 0.10's defaults put it in a YNNPACK fusion); the dot is in YNNPACK.
    assert not any("convolution(" in body for body in ynn_fusions(ours).values())
    assert any(" dot(" in body for body in ynn_fusions(ours).values())
    assert re.search(r"= f32\[[\d,]+\][^\n]* convolution\(", ours)
    np.testing.assert_allclose(jax.jit(conv_then_dot, compiler_options=options)(*inputs), jitted(*inputs),
                               rtol=1e-5, atol=1e-4)


def test_an_option_the_jaxlib_rejects_falls_back_to_the_defaults(monkeypatch):
    monkeypatch.setattr(compile_options, "CPU_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"})
    compile_options.compiler_options.cache_clear()
    try:
        assert compile_options.compiler_options() == {}
    finally:
        compile_options.compiler_options.cache_clear()
