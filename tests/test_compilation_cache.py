"""engine/compilation_cache.py: which folder each setting names, and that a second process loads what the first
compiled instead of compiling it again (counted with JAX's own cache events, in fresh processes, since a process
decides at its first compile whether it uses the cache)."""

import json
import os
import subprocess
import sys

import jax

from maskrcnn_jax.engine import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Enables the cache as the commands do, compiles one function, and prints JAX's cache events.
COMPILE_ONCE = """
import json, sys
import jax, jax.numpy as jnp
from maskrcnn_jax.engine import compilation_cache
events = {"hits": 0, "misses": 0}
def on_event(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
        events["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        events["misses"] += 1
jax.monitoring.register_event_listener(on_event)
events["directory"] = compilation_cache.enable(sys.argv[1] if len(sys.argv) > 1 else None)
jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))(jnp.ones((8, 8))).block_until_ready()
print(json.dumps(events))
"""


def compile_in_a_fresh_process(setting, env_cache_dir=None, xdg=None):
    env = {key: value for key, value in os.environ.items() if key != "JAX_COMPILATION_CACHE_DIR"}
    env.update(PYTHONPATH=ROOT, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
    if env_cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = env_cache_dir
    if xdg is not None:
        env["XDG_CACHE_HOME"] = xdg
    argv = [sys.executable, "-c", COMPILE_ONCE] + ([setting] if setting is not None else [])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def files_in(directory):
    return sum(len(files) for _, _, files in os.walk(directory))


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    cache = str(tmp_path / "cache")
    first = compile_in_a_fresh_process(cache)
    assert first["directory"] == cache and first["misses"] >= 1 and first["hits"] == 0
    written = files_in(cache)
    assert written >= 1
    second = compile_in_a_fresh_process(cache)
    assert second["hits"] >= 1 and second["misses"] == 0
    assert files_in(cache) == written


def test_an_empty_setting_turns_the_cache_off_even_where_jax_was_given_a_folder(tmp_path):
    cache = str(tmp_path / "cache")
    off = compile_in_a_fresh_process("", env_cache_dir=cache)
    assert off == {"hits": 0, "misses": 0, "directory": None}
    assert not os.path.exists(cache) or files_in(cache) == 0


def test_the_default_is_jaxs_folder_else_the_users_cache_directory(tmp_path):
    given = compile_in_a_fresh_process(None, env_cache_dir=str(tmp_path / "given"), xdg=str(tmp_path / "xdg"))
    assert given["directory"] == str(tmp_path / "given")
    default = compile_in_a_fresh_process(None, xdg=str(tmp_path / "xdg"))
    assert default["directory"] == str(tmp_path / "xdg" / "maskrcnn_jax" / "jax")
    assert files_in(default["directory"]) >= 1


def test_settings_name_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compilation_cache.cache_dir_for("") is None
    assert compilation_cache.cache_dir_for("~/here") == str(tmp_path / "here")
    assert compilation_cache.cache_dir_for(str(tmp_path / "there")) == str(tmp_path / "there")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert compilation_cache.user_cache_dir() == str(tmp_path / ".cache" / "maskrcnn_jax" / "jax")


def test_an_unwritable_folder_is_logged_and_the_run_goes_on(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
    try:
        assert compilation_cache.enable(str(blocker / "cache")) is None
    finally:
        jax.config.update("jax_compilation_cache_dir", previous[0])
        jax.config.update("jax_enable_compilation_cache", previous[1])
    assert "no persistent compilation cache: cannot make" in caplog.text
