"""What :func:`apply_activation_checkpointing` did, as a value that can be printed or logged."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Mechanism = Literal["hf", "wrap", "none"]


@dataclass(frozen=True)
class WrappedModule:
    """One block that activation checkpointing touched."""

    path: str
    """Dotted path, as in ``model.named_modules()`` (``""`` never: the root is not a block)."""
    class_name: str
    """The block's class name, e.g. ``"GPT2Block"``."""
    how: str
    """What happens to it, e.g. ``"checkpoint (full recompute)"``."""


@dataclass(frozen=True)
class ActivationCheckpointingReport:
    """The outcome of :func:`~ckpt_plugins.activation.apply_activation_checkpointing`."""

    mode: str
    """The mode that was applied (``"off"`` when nothing was done)."""
    mechanism: Mechanism
    """``"hf"``: the model's own ``activation_checkpointing_enable`` was used; ``"wrap"``: the
    blocks' ``forward`` was wrapped by this library; ``"none"``: nothing was changed."""
    wrapped: tuple[WrappedModule, ...] = ()
    """The blocks that are checkpointed/offloaded, in module order."""
    skipped: tuple[str, ...] = ()
    """Paths of target blocks left as they are (by ``mode="every_n"``)."""
    notes: tuple[str, ...] = ()
    """What the guards found or did (BatchNorm, ``use_cache``, frozen inputs, offload on CPU)."""
    already_applied: bool = False
    """True when the call was a no-op because the same config was already applied."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for loggers)."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        head = f"activation checkpointing: mode={self.mode}, mechanism={self.mechanism}"
        if self.already_applied:
            head += " (already applied; nothing changed)"
        lines = [head, f"  {len(self.wrapped)} module(s) wrapped, {len(self.skipped)} skipped"]
        lines += [f"  - {w.path} ({w.class_name}): {w.how}" for w in self.wrapped]
        if self.skipped:
            lines.append(f"  skipped: {', '.join(self.skipped)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
