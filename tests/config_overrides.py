"""A config file parsed as the command line parses it, with `--config.a.b=value` overrides (not a test module)."""

import os

from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_config(config_file, *overrides):
    """configs/`config_file` with `overrides`, through config_flags as main.py's --config flag reads it."""
    argv = ["prog", f"--config={os.path.join(ROOT, 'configs', config_file)}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config
