"""What Lightning reads from a ``ModelCheckpoint``, answered from the committed checkpoints.

Lightning and its loggers read ``best_model_path``, ``best_model_score``, ``last_model_path`` and
``best_k_models`` from the checkpoint callback (``ckpt_path="best"``, the ``ddp_spawn`` launcher,
W&B/MLflow uploads), and call ``_find_last_checkpoints`` for ``ckpt_path="last"`` before the
callback is set up. Here each is derived from the folders on disk, so it is right in a new
process (given ``dirpath``), after a resume, and after retention deleted checkpoints; a save still
in flight is not listed until it commits. Assigning one (as ``ModelCheckpoint.__init__`` and
Lightning's launchers do) sets the value used when there is no directory to read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ckpt_plugins.files.manifest import MANIFEST_NAME
from ckpt_plugins.lightning.reader import unregister_manager
from ckpt_plugins.manager import CheckpointManager
from ckpt_plugins.restore.choose import latest_usable

__all__ = ["CommittedPaths"]


class CommittedPaths:
    """Mixin for :class:`~ckpt_plugins.lightning.CheckpointCallback` (needs ``dirpath``,
    ``monitor``, ``mode`` and ``manager``)."""

    dirpath: Any
    monitor: str | None
    mode: str
    manager: CheckpointManager | None
    _storage_options: dict[str, Any] | None

    def name_template(self) -> str | None:
        """The core's name template of the checkpoints (None: ``step_<N>`` folders)."""
        return None

    def _resolve_dirpath(self, trainer: Any) -> str:
        """``dirpath``, else Lightning's rule for ``ModelCheckpoint`` (logger dir or root dir)."""
        if self.dirpath is not None:
            return os.fspath(self.dirpath)
        if trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            return os.path.join(save_dir, str(logger.name), version, "checkpoints")
        return os.path.join(trainer.default_root_dir, "checkpoints")

    def _reader(self, directory: str | None = None) -> CheckpointManager | None:
        """The live manager, else one read-only manager over ``dirpath`` (or ``directory``),
        built once and kept until teardown, when the directory exists."""
        if self.manager is not None and directory in (None, self.manager.directory):
            return self.manager
        directory = directory if directory is not None else (os.fspath(self.dirpath) if self.dirpath else None)
        if directory is None or ("://" not in directory and not os.path.isdir(directory)):
            return None
        cached = self.__dict__.get("_read_only")
        if cached is None or cached.directory != directory:
            self._drop_reader()
            cached = self.__dict__["_read_only"] = CheckpointManager(
                directory,
                read_only=True,
                monitor=self.monitor,
                mode=self.mode,  # type: ignore[arg-type]  # checked by the options model
                memory_tier=bool(getattr(self, "memory_options", {}).get("memory_tier")),  # to see the snapshots
                storage_options=self._storage_options,
                name_template=self.name_template(),
                **self._mirror(),  # the local copies too
            )
        return cached

    def _mirror(self) -> dict[str, Any]:
        """The ``mirror``/``keep_local`` options (empty without a mirror)."""
        options = getattr(self, "manager_options", {})
        if options.get("mirror") is None:
            return {}
        return {"mirror": options["mirror"], "keep_local": options["keep_local"]}

    def _drop_reader(self) -> None:
        cached = self.__dict__.pop("_read_only", None)
        if cached is not None:
            unregister_manager(cached)
            cached.close()

    def _committed_path(self, pick: Callable[[CheckpointManager], int | None], fallback: str) -> str:
        """The folder of the step ``pick`` chooses among committed checkpoints, else ``fallback``."""
        reader = self._reader()
        step = pick(reader) if reader is not None else None
        return reader.path_for(step) if step is not None else fallback  # type: ignore[union-attr]

    def _latest_path(self) -> str:
        return self._committed_path(CheckpointManager.latest_step, self._last_model_path)

    @property
    def last_model_path(self) -> str:
        """The newest committed checkpoint folder ("" when there is none); with ``save_last``,
        the committed ``last.ckpt`` (``CHECKPOINT_NAME_LAST``) once there is one."""
        if getattr(self, "save_last", None):
            last = self._last_model_path or self._default_last_path()
            if last and os.path.isdir(last):
                return last
        return self._latest_path()

    @last_model_path.setter
    def last_model_path(self, value: str) -> None:
        self._last_model_path = value

    def _default_last_path(self) -> str:
        if self.dirpath is None:
            return ""
        return os.path.join(
            os.fspath(self.dirpath),
            os.path.basename(self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)),  # type: ignore[attr-defined]
        )

    @property
    def best_model_path(self) -> str:
        """The best committed checkpoint folder by ``monitor``; without a monitor the latest, as
        Lightning reports it ("" when there is none)."""
        if self.monitor is None:
            return self._latest_path()
        return self._committed_path(CheckpointManager.best_step, self._best_model_path)

    @best_model_path.setter
    def best_model_path(self, value: str) -> None:
        self._best_model_path = value

    @property
    def best_model_score(self) -> torch.Tensor | None:
        """``monitor``'s value at the best checkpoint."""
        return self.best_k_models.get(self.best_model_path, self._best_model_score)

    @best_model_score.setter
    def best_model_score(self, value: torch.Tensor | None) -> None:
        self._best_model_score = value

    @property
    def best_k_models(self) -> dict[str, torch.Tensor]:
        """Committed checkpoints that have ``monitor``, folder -> value."""
        reader = self._reader()
        if reader is None or self.monitor is None:
            return {}
        paths = {c.step: c.path for c in reader.layout.committed()}
        return {
            paths[r.step]: torch.tensor(r.metrics[self.monitor])
            for r in reader.records()
            if self.monitor in r.metrics and r.step in paths
        }

    @best_k_models.setter
    def best_k_models(self, value: dict[str, torch.Tensor]) -> None:
        pass  # derived from the checkpoints on disk

    @property
    def kth_best_model_path(self) -> str:
        """The worst of the kept checkpoints that have ``monitor`` (the next one a better save
        would push out of ``keep_best``), as ``ModelCheckpoint`` reports it; "" without one."""
        scored = self.best_k_models
        if not scored:
            return ""
        pick = max if self.mode == "min" else min
        return pick(scored, key=lambda path: float(scored[path]))

    @kth_best_model_path.setter
    def kth_best_model_path(self, value: str) -> None:
        pass  # derived from the checkpoints on disk

    def _find_last_checkpoints(self, trainer: Any) -> set[str]:
        """For ``ckpt_path="last"`` (called before ``setup``): the newest committed folder that is
        usable, past damaged ones (the core's choice; each skipped one is a warning)."""
        reader = self._reader(self._resolve_dirpath(trainer))
        if reader is None:
            return set()
        choice = latest_usable(reader.layout)
        snapshot = reader.memory_snapshot()  # the in-memory tier: its newest, if not older
        if snapshot is not None and (choice.step is None or snapshot[0] >= choice.step):
            return {snapshot[1]}
        if choice.path is None:
            return set()
        mirrored = reader.mirror is not None and choice.path.startswith(reader.root.rstrip("/") + "/")
        if "://" not in reader.directory or mirrored:  # a local directory, or a mirror's local copy
            return {choice.path}
        # An object store: Lightning compares candidates by fs.modified(), which a prefix does not
        # have; its manifest object does, and loading that path loads the folder (lightning.reader).
        return {f"{reader.directory.rstrip('/')}/{choice.path.rstrip('/').rsplit('/', 1)[-1]}/{MANIFEST_NAME}"}
