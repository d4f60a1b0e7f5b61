"""The callback's checkpoint names in tests: ``ModelCheckpoint``'s ``epoch=E-step=N.ckpt`` folders."""

from __future__ import annotations

import re
from pathlib import Path

_STEP = re.compile(r"(?:^|[-_])step=([0-9]+)(?:-v[0-9]+)?\.ckpt$")


def steps_in(directory: str | Path) -> list[int]:
    """Steps of the committed-looking checkpoint names in ``directory``, ascending."""
    return sorted(
        int(m.group(1)) for p in Path(directory).iterdir() if (m := _STEP.search(p.name)) and not p.name.startswith(".")
    )


def path_of(directory: str | Path, step: int) -> Path:
    """The one checkpoint of ``step`` in ``directory``."""
    found = [p for p in Path(directory).iterdir() if (m := _STEP.search(p.name)) and int(m.group(1)) == step]
    assert len(found) == 1, (step, sorted(p.name for p in Path(directory).iterdir()))
    return found[0]
