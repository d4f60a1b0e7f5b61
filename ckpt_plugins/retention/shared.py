"""Which shared (dedup) files may go: the reference count over the checkpoints that stay.

Pure: the layout lists the pool and reads the manifests, this decides. A file is deleted only
when no manifest on disk refers to it and no save in flight has reserved it; when a manifest
could not be read, nothing is deleted (its references are unknown).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

__all__ = ["reference_counts", "unreferenced"]


def reference_counts(references: Iterable[Iterable[str]]) -> Counter[str]:
    """How many checkpoints refer to each shared file (each checkpoint counted once per file)."""
    counts: Counter[str] = Counter()
    for names in references:
        counts.update(set(names))
    return counts


def unreferenced(
    present: Iterable[str], references: Iterable[Iterable[str]] | None, reserved: Iterable[str] = ()
) -> set[str]:
    """The shared files in ``present`` that can be deleted.

    Args:
        present: the files in the pool.
        references: per kept checkpoint (every folder with a manifest), the shared files it reads;
            None when some manifest could not be read: then nothing may be deleted.
        reserved: files a save in flight writes or refers to (not committed yet).
    """
    if references is None:
        return set()
    counts = reference_counts(references)
    return {name for name in present if counts[name] == 0} - set(reserved)
