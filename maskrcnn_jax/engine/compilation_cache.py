"""JAX's persistent compilation cache: compiled executables kept on disk, so that a second run of the same function
on the same shapes and machine loads its executable instead of compiling it (training, evaluation, prediction).

`config.compilation_cache_dir` (and `maskrcnn-predict --compilation-cache-dir`) chooses the folder: None (the
default) is the folder JAX is already given (JAX_COMPILATION_CACHE_DIR, or jax.config), else the user's cache
directory, $XDG_CACHE_HOME/maskrcnn_jax/jax (else ~/.cache/maskrcnn_jax/jax); "" turns the cache off; anything else
is the folder. It must be enabled before the process compiles anything: JAX decides once, at its first compile,
whether the cache is used. Only executables that took JAX's jax_persistent_cache_min_compile_time_secs (1 s by
default) to compile are kept: the network's are, the small host-side functions' are not worth a file.
"""

from __future__ import annotations

import os

import jax
from absl import logging

CACHE_SUBDIR = os.path.join("maskrcnn_jax", "jax")


def user_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, CACHE_SUBDIR)


def cache_dir_for(setting: str | None) -> str | None:
    """The folder `setting` names (see the module docstring), or None when the cache is off."""
    if setting is None:
        return jax.config.jax_compilation_cache_dir or user_cache_dir()
    if setting == "":
        return None
    return os.path.abspath(os.path.expanduser(setting))


def enable(setting: str | None) -> str | None:
    """Points JAX's persistent compilation cache at the folder `setting` names; returns it, or None when the cache
    is off or its folder cannot be made (logged: the run goes on, compiling as without a cache)."""
    directory = cache_dir_for(setting)
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        logging.warning("no persistent compilation cache: cannot make %s (%s)", directory, error)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory
