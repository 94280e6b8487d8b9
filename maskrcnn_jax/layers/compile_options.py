"""XLA compile options for the programs this package jits: on the CPU, convolutions stay off YNNPACK.

By default (jax 0.10) XLA's CPU backend hands every top-level convolution and dot to YNNPACK. For this model's
convolutions XLA's own convolution runtime is faster on the CPU: R50-FPN's forward at 800x1344 takes 1.71 s against
2.01 s, and the demo backbone's forward (ResNet-18 GN + FPN 64, 4 images of 192 px) 0.075 s against 0.092 s
(benchmarks/RESULTS.md). Dots stay with YNNPACK. The options only matter on the CPU; elsewhere they are left out.

Only JAX is imported here, so that serving/exported_model.py can use it without the modeling code.
"""

import functools
import logging

import jax
import jax.numpy as jnp

# DebugOptions.xla_cpu_experimental_ynn_fusion_type: the ops YNNPACK takes; the default also lists convolutions.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def compiler_options() -> dict[str, str]:
    """``compiler_options`` for ``jax.jit`` on the default backend: CPU_OPTIONS on the CPU when this jaxlib knows
    them, else none (an XLA without the option rejects it at compile time)."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(jnp.zeros((), jnp.float32)).compile()
    except Exception as error:  # noqa: BLE001  (XLA reports an unknown option or value as a runtime error)
        logging.info("XLA rejects %s (%s); compiling with its defaults", CPU_OPTIONS, error)
        return {}
    return dict(CPU_OPTIONS)
