"""``CheckpointIOPlugin``: Lightning's ``CheckpointIO`` backed by the core.

Lightning routes every checkpoint file through the strategy's ``CheckpointIO``: ``ModelCheckpoint``
saves and removes through it, ``fit(ckpt_path=...)`` and ``test(ckpt_path=...)`` load through it.
Adding this plugin to an existing ``Trainer`` changes how the bytes are written, not which
checkpoints exist: the same names, the same ``save_top_k`` decisions, but each ``.ckpt`` is one
file in our single-file format (safetensors with the state tree and a checksum in its header,
:mod:`ckpt_plugins.files.single_file`), committed atomically by rename, written in the
background::

    trainer = Trainer(callbacks=[ModelCheckpoint(save_top_k=2, monitor="val_loss")],
                      plugins=[CheckpointIOPlugin(async_save=True)])

The path is taken when ``save_checkpoint`` returns (a name reservation), a load of a path still
being written waits for it, a removal runs after the saves before it, and ``teardown`` flushes
and stops the writer (:mod:`.saves`). ``load_checkpoint`` reads our files and folders and
Lightning's ``.ckpt`` files (``weights_only``; Lightning's ``weights_only=False`` is the explicit
opt-in to full pickle). ``MyModule.load_from_checkpoint(path)`` reads our files too
(:mod:`.load_hook`).

Under ``torch.distributed`` Lightning calls ``save_checkpoint`` on global rank 0 only, so the
plugin saves the same way there. A hidden name (Lightning's ``ddp_spawn`` launchers save
``.temp.ckpt`` and remove it with a non-recursive ``fs.rm``) is written as a Lightning file,
synchronously.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from ckpt_plugins.errors import CorruptCheckpointError, UnsupportedStateError
from ckpt_plugins.lightning import load_hook
from ckpt_plugins.lightning.path_mirror import PathMirror
from ckpt_plugins.lightning.reader import read_lightning_checkpoint
from ckpt_plugins.lightning.saves import PathSaves, wait_for
from ckpt_plugins.lightning.state import RANK_STATE_KEY, explain_unsupported, to_storable
from ckpt_plugins.options import MirrorOptions, RestoreOptions, SaveOptions
from ckpt_plugins.options.checks import check_storage_options

__all__ = ["CheckpointIOPlugin"]

log = logging.getLogger(__name__)

load_hook.install()


class CheckpointIOPlugin(CheckpointIO):
    """Atomic, checksummed, asynchronous checkpoints for any Lightning ``Trainer``.

    Args:
        async_save: return from ``save_checkpoint`` once the state is copied into reused host
            buffers; write and commit in the background.
        max_pending: saves in flight at once; a further save waits.
        writer: ``"thread"`` or ``"process"`` (tensor files written by a separate process, no
            GIL contention with training; needs ``async_save``).
        on_error: ``"raise"``: a failed background save raises at the next save, removal or
            teardown; ``"warn"``: it is logged and training goes on.
        verify: check checksums when loading.
        storage_options: for URL paths (``s3://...``): passed to their fsspec file system
            (endpoint, credentials); ``trainer.save_checkpoint(path, storage_options=...)`` adds
            to them for that save. Never saved or logged.
        mirror: the local-first tier for URL paths (docs/storage.md): a save of
            ``s3://.../name.ckpt`` commits to ``<mirror>/name.ckpt`` first and is uploaded in the
            background; a load reads the local copy when there is one. One remote directory.
        keep_local: with ``mirror``, keep the newest N uploaded files locally too.

    Example:
        >>> trainer = Trainer(plugins=[CheckpointIOPlugin()])  # doctest: +SKIP
    """

    def __init__(
        self,
        async_save: bool = True,
        max_pending: int = 1,
        writer: Literal["thread", "process"] = "thread",
        on_error: Literal["raise", "warn"] = "raise",
        verify: bool = True,
        storage_options: dict[str, Any] | None = None,
        mirror: str | os.PathLike[str] | None = None,
        keep_local: int = 1,
    ) -> None:
        # the core's checks
        SaveOptions(async_save=async_save, max_pending=max_pending, writer=writer, on_error=on_error)
        RestoreOptions(verify=verify)
        mirror_options = MirrorOptions(mirror=mirror, keep_local=keep_local)
        self._mirror = PathMirror(mirror_options) if mirror_options.mirror is not None else None
        check_storage_options("storage_options", storage_options)
        self.async_save, self.max_pending, self.writer = async_save, max_pending, writer
        self.on_error, self.verify = on_error, verify
        self._saves = PathSaves(async_save=async_save, max_pending=max_pending, writer=writer, on_error=on_error)
        self._warned: set[str] = set()
        self._storage_options = storage_options  # to fsspec only; not in repr

    # --- CheckpointIO ------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Save Lightning's checkpoint dict as the file ``path`` (single-file format, atomic).

        ``storage_options`` (what ``trainer.save_checkpoint(..., storage_options=)`` passes) go to
        the fsspec file system of a URL ``path``, over the plugin's own.

        Raises:
            ConfigError: ``storage_options`` is not a dict.
            UnsupportedStateError: the dict holds an object that cannot be stored without pickle
                (the message names the key and where it comes from).
            SaveError: an earlier background save failed (``on_error="raise"``).
        """
        check_storage_options("storage_options", storage_options)
        options = {**(self._storage_options or {}), **(storage_options or {})} or None
        path = os.fspath(path)
        if os.path.basename(path.rstrip("/")).startswith("."):  # Lightning's .temp.ckpt: its own format
            TorchCheckpointIO().save_checkpoint(checkpoint, path)
            return
        state, converted = to_storable(checkpoint, self._warned)
        state.pop(RANK_STATE_KEY, None)
        step = checkpoint.get("global_step", 0)
        step = step if isinstance(step, int) and step >= 0 else 0
        meta = {"kind": "lightning", "hyper_parameters_converted": converted}
        local = self._mirror.local_path(path, options) if self._mirror is not None else None
        try:
            if local is None:
                self._saves.save(path, step, state, meta, options)
                return
            written: list[Any] = []
            handle = self._saves.save(local, step, state, meta, None, written)
        except UnsupportedStateError as exc:
            raise explain_unsupported(exc) from None
        assert self._mirror is not None
        self._mirror.upload_after(handle, local, path, written, options)

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load ``path``: one of our files or folders, or a Lightning ``.ckpt`` file.

        Args:
            path: the checkpoint.
            map_location: a device or a device string; anything else loads to CPU.
            weights_only: ``False`` allows full pickle for ``.ckpt`` files (trusted files only);
                ``None``/``True`` never unpickle code.

        Raises:
            FileNotFoundError: nothing at ``path``.
            UnsafeCheckpointError: a ``.ckpt`` needs full pickle and ``weights_only`` is not False.
        """
        wait_for(path)  # a save of this path may still be in flight (in any plugin of this process)
        local = self._mirror.local_copy(os.fspath(path)) if self._mirror is not None else None
        if local is not None and os.path.exists(local):
            try:  # the local copy first, verified; the store's when it is damaged
                return read_lightning_checkpoint(
                    local, map_location=map_location, allow_unsafe_pickle=weights_only is False, verify=True
                )
            except CorruptCheckpointError as exc:
                log.warning("%s; reading %s from the store instead", exc, path)
        return read_lightning_checkpoint(
            path,
            map_location=map_location,
            allow_unsafe_pickle=weights_only is False,
            verify=self.verify,
            storage_options=self._storage_options,
        )

    def remove_checkpoint(self, path: _PATH) -> None:
        """Remove ``path``; with saves in flight the removal runs after them, on the writer."""
        local = self._mirror.local_copy(os.fspath(path)) if self._mirror is not None else None
        if local is None:
            self._saves.remove(os.fspath(path), self._storage_options)
            return
        assert self._mirror is not None
        self._saves.remove(local)
        self._mirror.remove(os.fspath(path), self._storage_options)

    def teardown(self) -> None:
        """Wait for every save to commit, run queued removals, stop the writer; with ``mirror``,
        wait for the uploads."""
        try:
            self._saves.close()
        finally:
            if self._mirror is not None:
                self._mirror.close()

    def __repr__(self) -> str:
        return (
            f"CheckpointIOPlugin(async_save={self.async_save}, max_pending={self.max_pending}, "
            f"writer={self.writer!r}, on_error={self.on_error!r})"
        )
