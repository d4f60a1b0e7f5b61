"""``CheckpointIOPlugin``: Lightning's ``CheckpointIO`` backed by the core.

Lightning routes every checkpoint file through the strategy's ``CheckpointIO``: ``ModelCheckpoint``
saves and removes through it, ``fit(ckpt_path=...)`` and ``test(ckpt_path=...)`` load through it.
Adding this plugin to an existing ``Trainer`` changes how the bytes are written, not which
checkpoints exist: the same names, the same ``save_top_k`` decisions, but each checkpoint is a
folder in our format (``manifest.json`` + safetensors, checksums), committed atomically, and
written in the background::

    trainer = Trainer(callbacks=[ModelCheckpoint(save_top_k=2, monitor="val_loss")],
                      plugins=[CheckpointIOPlugin(async_save=True)])

``load_checkpoint`` reads our folders and Lightning's ``.ckpt`` files (``weights_only``; Lightning's
``weights_only=False`` is the explicit opt-in to full pickle). ``remove_checkpoint`` never
overtakes a save still in flight, and ``teardown`` flushes.

Under ``torch.distributed`` Lightning calls ``save_checkpoint`` on global rank 0 only; the
plugin's managers are single-rank (``distributed=False``: no collectives), so it saves the same
way there. A hidden name (Lightning's ``ddp_spawn`` launchers save ``.temp.ckpt`` and remove it
with a non-recursive ``fs.rm``) is written as a Lightning file, synchronously.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from ckpt_plugins.errors import ConfigError, UnsupportedStateError
from ckpt_plugins.manager import CheckpointManager
from ckpt_plugins.options import RestoreOptions, SaveOptions

from ckpt_plugins.lightning.named import NamedSaves, is_folder_name
from ckpt_plugins.lightning.reader import read_lightning_checkpoint
from ckpt_plugins.lightning.state import RANK_STATE_KEY, explain_unsupported, to_storable

__all__ = ["CheckpointIOPlugin"]

log = logging.getLogger(__name__)


class CheckpointIOPlugin(CheckpointIO):
    """Atomic, checksummed, asynchronous checkpoints for any Lightning ``Trainer``.

    Args:
        async_save: return from ``save_checkpoint`` once the state is copied into reused host
            buffers; write and commit in the background.
        max_pending: saves in flight at once (per directory); a further save waits.
        writer: ``"thread"`` or ``"process"`` (tensor files written by a separate process, no
            GIL contention with training; needs ``async_save``).
        on_error: ``"raise"``: a failed background save raises at the next save, removal or
            teardown; ``"warn"``: it is logged and training goes on.
        verify: check checksums when loading.

    Example:
        >>> trainer = Trainer(plugins=[CheckpointIOPlugin()])  # doctest: +SKIP
    """

    def __init__(self, async_save: bool = True, max_pending: int = 1, writer: Literal["thread", "process"] = "thread",
                 on_error: Literal["raise", "warn"] = "raise", verify: bool = True) -> None:
        SaveOptions(async_save=async_save, max_pending=max_pending, writer=writer, on_error=on_error)  # the core's checks
        RestoreOptions(verify=verify)
        self.async_save, self.max_pending, self.writer = async_save, max_pending, writer
        self.on_error, self.verify = on_error, verify
        self._saves: NamedSaves | None = None
        self._managers: list[CheckpointManager] = []
        self._warned: set[str] = set()

    # --- CheckpointIO ------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Save Lightning's checkpoint dict as the folder ``path`` (our format, atomic commit).

        Raises:
            ConfigError: ``storage_options`` was given (this plugin has none).
            UnsupportedStateError: the dict holds an object that cannot be stored without pickle
                (the message names the key and where it comes from).
            SaveError: an earlier background save failed (``on_error="raise"``).
        """
        if storage_options is not None:
            raise ConfigError("CheckpointIOPlugin takes no storage_options; call "
                              "trainer.save_checkpoint(path) without them")
        path = os.fspath(path)
        if not is_folder_name(path):  # hidden (Lightning's .temp.ckpt): a plain file, as Lightning writes it
            TorchCheckpointIO().save_checkpoint(checkpoint, path)
            return
        state, converted = to_storable(checkpoint, self._warned)
        state.pop(RANK_STATE_KEY, None)
        try:
            step = checkpoint.get("global_step", 0)
            step = step if isinstance(step, int) and step >= 0 else 0
            self._named().save(path, step, state, {"kind": "lightning", "hyper_parameters_converted": converted})
        except UnsupportedStateError as exc:
            raise explain_unsupported(exc) from None

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Load ``path``: one of our folders or a Lightning ``.ckpt`` file.

        Args:
            path: the checkpoint.
            map_location: a device or a device string; anything else loads to CPU.
            weights_only: ``False`` allows full pickle for ``.ckpt`` files (trusted files only);
                ``None``/``True`` never unpickle code.

        Raises:
            FileNotFoundError: nothing at ``path``.
            UnsafeCheckpointError: a ``.ckpt`` needs full pickle and ``weights_only`` is not False.
        """
        path = os.fspath(path)
        named = self._named()
        named.flush()  # a save to this path may still be in flight
        named.recover(path)
        return read_lightning_checkpoint(path, map_location=map_location, allow_unsafe_pickle=weights_only is False,
                                         verify=self.verify, managers=self._managers)

    def remove_checkpoint(self, path: _PATH) -> None:
        """Remove ``path``; with saves in flight the removal runs after them, on the writer."""
        self._named().remove(os.fspath(path))

    def teardown(self) -> None:
        """Wait for every save to commit, run queued removals, release the directories."""
        saves, self._saves = self._saves, None
        if saves is not None:
            saves.close()

    def _named(self) -> NamedSaves:
        if self._saves is None:
            self._saves = NamedSaves(async_save=self.async_save, max_pending=self.max_pending, writer=self.writer,
                                     on_error=self.on_error)
        return self._saves

    # --- for CheckpointCallback --------------------------------------------------------------
    def attach(self, manager: CheckpointManager) -> None:
        """Load ``manager``'s checkpoint folders through it (it protects the one resumed from)."""
        if manager not in self._managers:
            self._managers.append(manager)

    def detach(self, manager: CheckpointManager) -> None:
        if manager in self._managers:
            self._managers.remove(manager)

    def __repr__(self) -> str:
        return (f"CheckpointIOPlugin(async_save={self.async_save}, max_pending={self.max_pending}, "
                f"writer={self.writer!r}, on_error={self.on_error!r})")
