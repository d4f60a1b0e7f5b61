"""``ModelCheckpoint``'s names and checkpoint dict, for :class:`~ckpt_plugins.lightning.CheckpointCallback`.

The names are Lightning's own: the callback formats each one with
``ModelCheckpoint.format_checkpoint_name`` (``filename``, ``auto_insert_metric_name``,
``CHECKPOINT_EQUALS_CHAR``, ``FILE_EXTENSION``, ``-vN``). The core lists, orders and retains
checkpoints by a :class:`~ckpt_plugins.layout.naming.NameTemplate`; :func:`checkpoint_name_template`
obtains it from the same formatting, run once with placeholders in place of the values, so the
two can never disagree about what a name looks like.

The checkpoint dict is built by ``trainer.save_checkpoint(path, weights_only)``, as
``ModelCheckpoint`` does (so wrappers and profilers of it see every save), with the strategy's
``CheckpointIO`` swapped for one that only keeps the dict: the manager writes it, on every rank.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.strategies import Strategy

from ckpt_plugins.layout.naming import VERSION_PREFIX

__all__ = ["build_checkpoint", "checkpoint_name_template"]


class _Placeholder:
    """Formats as ``{name}`` whatever the format spec (``{epoch:02d}`` gives ``{epoch}``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __format__(self, spec: str) -> str:
        return "{" + self.name + "}"


class _Fields(dict[str, Any]):
    """Every field name is present and holds its placeholder."""

    def __contains__(self, key: object) -> bool:
        return True

    def __missing__(self, key: str) -> _Placeholder:
        return _Placeholder(key)


def checkpoint_name_template(callback: Any) -> str:
    """The core template of ``callback``'s names: ``epoch={epoch}-step={step}{version}.ckpt`` for
    the default ``filename`` (``{version}`` only with ``enable_version_counter``)."""
    dirpath, callback.dirpath = callback.dirpath, None  # the name only
    try:
        plain = callback.format_checkpoint_name(_Fields())
        if not callback._enable_version_counter:
            return str(plain)
        versioned = str(callback.format_checkpoint_name(_Fields(), ver=_Placeholder("version")))
    finally:
        callback.dirpath = dirpath
    ext = callback.FILE_EXTENSION
    stem = plain[: len(plain) - len(ext)] if ext and plain.endswith(ext) else plain
    if callback.CHECKPOINT_JOIN_CHAR + "v" != VERSION_PREFIX or versioned != f"{stem}{VERSION_PREFIX}{{version}}{ext}":
        # versions spelled another way (a subclass): Lightning's ``-vN`` names are not listed
        return str(plain)
    return f"{stem}{{version}}{ext}"


class _KeepDict(CheckpointIO):
    """A ``CheckpointIO`` that keeps the checkpoint dict it is given instead of writing it."""

    def __init__(self) -> None:
        self.checkpoint: dict[str, Any] | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.checkpoint = checkpoint

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> dict[str, Any]:
        raise RuntimeError("this CheckpointIO only collects a checkpoint dict")

    def remove_checkpoint(self, path: Any) -> None:
        pass


def build_checkpoint(trainer: Any, filepath: str | os.PathLike, weights_only: bool) -> dict[str, Any] | None:
    """Lightning's checkpoint dict for a save to ``filepath`` (None on ranks other than 0, where
    Lightning does not hand it to the IO; the manager writes the shared state from rank 0).

    Through ``trainer.save_checkpoint`` when the strategy saves through its ``CheckpointIO``;
    a strategy that writes by itself (FSDP, DeepSpeed, ``ModelParallelStrategy``) gets the dict
    from the checkpoint connector directly, on every rank, as before.
    """
    strategy = trainer.strategy
    if type(strategy).save_checkpoint is not Strategy.save_checkpoint:
        return trainer._checkpoint_connector.dump_checkpoint(weights_only)
    keep, configured = _KeepDict(), strategy._checkpoint_io
    strategy._checkpoint_io = keep
    try:
        trainer.save_checkpoint(os.fspath(filepath), weights_only)
    finally:
        strategy._checkpoint_io = configured
    return keep.checkpoint
