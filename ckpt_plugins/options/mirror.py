"""``MirrorOptions``: the local-first tier (commit locally, upload in the background).

``CheckpointManager("s3://bucket/run", mirror="/local/ckpt", keep_local=2)`` commits every
checkpoint to the local directory first (a local commit: fast, and a crash on this host resumes
from local disk), uploads each committed one to ``directory`` in the background, and keeps the
newest ``keep_local`` locally. ``mirror_options=MirrorOptions(mirror=..., keep_local=...)`` is the
same as one object. The design and why it is safe: docs/storage.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ckpt_plugins.errors import ConfigError
from ckpt_plugins.options.checks import check_directory, check_positive_int

__all__ = ["MirrorOptions"]


@dataclass(frozen=True)
class MirrorOptions:
    """Where the local copy lives and how much of it is kept."""

    mirror: str | os.PathLike[str] | None = None
    """A local directory that every checkpoint is committed to first; ``directory`` (an object
    store URL) gets each committed one by a background upload. None: no local tier."""
    keep_local: int = 1
    """Keep the newest N uploaded checkpoints in ``mirror`` too (a checkpoint not yet uploaded is
    never removed from it)."""

    def __post_init__(self) -> None:
        if self.mirror is not None:
            check_directory("mirror", self.mirror)
            text = os.fspath(self.mirror)
            if "://" in text and not text.startswith("file://"):
                raise ConfigError(
                    f"$mirror must be a local directory, got the URL {text!r}; the object store goes in "
                    "directory, the local copy in mirror",
                    option="mirror",
                    value=self.mirror,
                )
        check_positive_int("keep_local", self.keep_local)
        if self.mirror is None and self.keep_local != 1:
            raise ConfigError(
                f"$keep_local={self.keep_local!r} needs $mirror, the local directory it applies to",
                option="keep_local",
                value=self.keep_local,
                mentions=("mirror",),
            )

    @property
    def local_path(self) -> str | None:
        """``mirror`` as an absolute local path (None without a mirror)."""
        if self.mirror is None:
            return None
        text = os.fspath(self.mirror)
        text = text[len("file://") :] if text.startswith("file://") else text
        return os.path.abspath(os.path.expanduser(text))
