"""Our checkpoints in plain Lightning workflows: ``load_from_checkpoint`` and ``.ckpt`` files.

Lightning's ``LightningModule.load_from_checkpoint`` and ``TorchCheckpointIO`` read ``torch.save``
files. :func:`load_from_checkpoint` hands them one of our folders directly (through an in-memory
``torch.save`` of the checkpoint dict, so Lightning's own loading, hooks and migrations run), and
:func:`to_lightning_checkpoint` writes a plain ``.ckpt`` for tools that want a file
(``ckpt-plugins convert --to lightning SRC DST``). The dict holds only plain data (see
:mod:`.state`), so the ``.ckpt`` loads with ``torch.load(weights_only=True)``.

Per-rank RNG states and data positions are not copied into the ``.ckpt``: resuming from it is a
normal Lightning resume, exact at epoch boundaries.

Nothing here imports Lightning.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any, TypeVar

import torch

from ckpt_plugins.errors import CheckpointNotFoundError
from ckpt_plugins.lightning.reader import read_lightning_checkpoint
from ckpt_plugins.lightning.state import RANK_STATE_KEY
from ckpt_plugins.manager import CheckpointManager
from ckpt_plugins.restore.read import is_our_checkpoint
from ckpt_plugins.storage import open_storage

__all__ = ["load_from_checkpoint", "to_lightning_checkpoint"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CALLBACK_NAMES = "epoch={epoch}-step={step}{version}.ckpt"
"""``CheckpointCallback``'s default names (``ModelCheckpoint``'s), as a core name template."""


def _checkpoint_dict(src: str | os.PathLike, step: int | str | None) -> tuple[dict[str, Any], str]:
    """Read ``src`` (a checkpoint folder, a run directory, or a ``.ckpt``) as a Lightning dict."""
    src = os.fspath(src)
    storage, root = open_storage(src)
    if storage.isdir(root) and not is_our_checkpoint(storage, root):
        chosen_path = None
        for template in (None, CALLBACK_NAMES):  # step_<N> folders, or the callback's default names
            with CheckpointManager(src, read_only=True, name_template=template) as mgr:
                which = step if step is not None else "latest"
                chosen = mgr.latest_step() if which == "latest" else int(which)
                if chosen is not None and mgr.steps():
                    chosen_path = mgr.path_for(chosen)
                    break
        if chosen_path is None:
            raise CheckpointNotFoundError(f"{src} has no committed checkpoint to convert")
        src = chosen_path
    elif step is not None:
        raise CheckpointNotFoundError(f"--step applies to a run directory; {src} is one checkpoint")
    checkpoint = read_lightning_checkpoint(src)
    checkpoint.pop(RANK_STATE_KEY, None)
    if "state_dict" not in checkpoint:
        raise CheckpointNotFoundError(
            f"{src} is not a Lightning checkpoint (it has no 'state_dict'); "
            "only checkpoints written by the Lightning integration convert"
        )
    return checkpoint, src


def to_lightning_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, step: int | None = None) -> str:
    """Write one of our Lightning checkpoints as a plain ``.ckpt`` file.

    Args:
        src: a checkpoint folder, or a run directory (its latest checkpoint, or ``step``).
        dst: the ``.ckpt`` file to write (replaced atomically if it exists).
        step: with a run directory, which step.

    Returns:
        The folder that was converted.

    Raises:
        CheckpointNotFoundError: ``src`` has no such checkpoint, or it is not a Lightning one.

    Example:
        >>> to_lightning_checkpoint("ckpts", "model.ckpt")  # doctest: +SKIP
        >>> MyModule.load_from_checkpoint("model.ckpt")  # doctest: +SKIP
    """
    checkpoint, source = _checkpoint_dict(src, step)
    dst = os.fspath(dst)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("converted %s to %s", source, dst)
    return source


def load_from_checkpoint(cls: type[T], path: str | os.PathLike, **kwargs: Any) -> T:
    """``cls.load_from_checkpoint`` for one of our checkpoint folders (or a run directory).

    Args:
        cls: a ``LightningModule`` (or ``LightningDataModule``) subclass.
        path: a checkpoint folder, a run directory (its latest checkpoint), or a ``.ckpt``.
        kwargs: passed to ``cls.load_from_checkpoint`` (``map_location``, ``strict``, and
            hyper-parameter overrides, e.g. objects stored as strings; see :mod:`.state`).

    Returns:
        The loaded module.

    Example:
        >>> model = load_from_checkpoint(MyModule, "ckpts/step_500")  # doctest: +SKIP
    """
    checkpoint, _ = _checkpoint_dict(path, None)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return cls.load_from_checkpoint(buffer, **kwargs)  # type: ignore[attr-defined]
