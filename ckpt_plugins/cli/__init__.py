"""``ckpt-plugins``: list, inspect, verify, prune, diff and convert checkpoints from the shell."""

from ckpt_plugins.cli.main import main

__all__ = ["main"]
