"""layers/host_memory.py: the compiler's freed memory goes back to the OS, and jit runs the executable compiled
ahead without compiling again."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from maskrcnn_jax.layers import host_memory

# In a fresh process: 256 MB of 1 KB blocks are freed below one block still in use, so that malloc cannot give them
# back by shrinking the heap's top; only release_freed_memory can. Prints the resident MB it gave back.
FREED_BELOW_A_LIVE_BLOCK = textwrap.dedent("""
    import ctypes
    from maskrcnn_jax.layers import host_memory

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def resident_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    blocks = [libc.malloc(1024) for _ in range(256 * 1024)]
    for block in blocks:
        ctypes.memset(block, 1, 1024)
    live = libc.malloc(1024)
    for block in blocks:
        libc.free(block)
    before = resident_mb()
    assert host_memory.release_freed_memory()
    print(before - resident_mb())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._malloc_trim() is None,
                    reason="needs glibc's malloc_trim")
def test_release_freed_memory_returns_freed_heap_pages_to_the_os():
    released = subprocess.run([sys.executable, "-c", FREED_BELOW_A_LIVE_BLOCK], capture_output=True, text=True,
                              check=True).stdout
    assert float(released) > 200, released


def test_compile_ahead_leaves_the_executable_to_the_jit_call():
    jitted = jax.jit(lambda x: jnp.sin(x) @ x + 7)
    x = jnp.arange(16.0).reshape(4, 4)
    expected = jnp.sin(x) @ x + 7
    compiles = []

    def on_event(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        host_memory.compile_ahead(jitted, x)
        assert len(compiles) == 1
        result = jitted(x)
        assert len(compiles) == 1
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert jnp.allclose(result, expected)
