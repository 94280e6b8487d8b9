"""Hand the memory XLA's compiler freed back to the operating system before a compiled program first runs.

Compiling the R50-FPN train step on the CPU allocates about 1.4 GB inside XLA (its passes and LLVM) and frees it
again, but glibc's malloc keeps freed pages in its arenas, so the process' resident memory stays that much higher
for good, and the step's own buffers come on top of it (benchmarks/RESULTS.md). glibc's malloc_trim returns them.
Where the C library has no malloc_trim (macOS, musl) this does nothing.
"""

import ctypes
import functools
import logging


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        logging.info("the C library has no malloc_trim: freed compiler memory stays with the process")
        return None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the operating system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def compile_ahead(jitted, *args, **kwargs) -> None:
    """Compile `jitted` (a jax.jit function) for these arguments, then release the compiler's freed memory. jit
    keeps the executable, so the call that follows runs it without compiling again."""
    jitted.lower(*args, **kwargs).compile()
    release_freed_memory()
