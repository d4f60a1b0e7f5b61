"""Finding the blocks to checkpoint.

Activation checkpointing pays off per *block*: the unit whose inputs are kept and whose inside is
recomputed. Checkpointing a single ``Linear`` saves nothing, checkpointing the whole model keeps
nothing but costs a second forward at once. So ``targets="auto"`` looks for the repeated blocks:

1. a Hugging Face model's decoder layers - the modules whose class derives from
   ``transformers.modeling_layers.GradientCheckpointingLayer`` (recognised by class name, so
   this module does not import transformers);
2. otherwise the repeated children of the largest ``nn.ModuleList``/``nn.Sequential`` - the
   container whose most common child class holds the most parameters.

Explicit targets are class names or globs on module paths; see
:attr:`ActivationCheckpointing.targets`.
"""

from __future__ import annotations

import fnmatch
from collections import Counter

from torch import nn

from ckpt_plugins.errors import ConfigError

_HF_LAYER_BASE = "GradientCheckpointingLayer"

Block = tuple[str, nn.Module]


def is_hf_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``GradientCheckpointingLayer``."""
    return any(cls.__name__ == _HF_LAYER_BASE for cls in type(module).__mro__[1:])


def find_blocks(model: nn.Module, targets: tuple[str, ...] | None) -> list[Block]:
    """The blocks of ``model`` that ``targets`` names, in module order, outermost only.

    Args:
        model: the model.
        targets: patterns (class names or path globs), or ``None`` for automatic discovery.

    Returns:
        ``(path, module)`` pairs; ``path`` as in ``model.named_modules()``.

    Raises:
        ConfigError: automatic discovery found no repeated blocks, or a pattern matched nothing
            (the message lists the class names present).
    """
    if targets is None:
        return _auto_blocks(model)
    matched: list[Block] = []
    for pattern in targets:
        hits = [
            (path, m)
            for path, m in model.named_modules()
            if path and (type(m).__name__ == pattern or fnmatch.fnmatchcase(path, pattern))
        ]
        if not hits:
            raise ConfigError(
                f"activation checkpointing target {pattern!r} matched no module of "
                f"{type(model).__name__}; use a class name among {_class_names(model)} or a glob "
                "on module paths such as 'layers.*'."
            )
        matched.extend(hits)
    return _outermost(model, matched)


def _auto_blocks(model: nn.Module) -> list[Block]:
    hf_layers = [(path, m) for path, m in model.named_modules() if path and is_hf_layer(m)]
    if hf_layers:
        return _outermost(model, hf_layers)
    best: tuple[int, list[Block]] | None = None
    for path, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(container.named_children())
        counts = Counter(type(child) for _, child in children)
        for cls, count in counts.items():
            if count < 2:
                continue
            blocks = [(f"{path}.{name}" if path else name, child) for name, child in children if type(child) is cls]
            size = sum(p.numel() for _, b in blocks for p in b.parameters())
            if size > 0 and (best is None or size > best[0]):
                best = (size, blocks)
    if best is None:
        raise ConfigError(
            f"activation checkpointing targets='auto' found no repeated blocks in "
            f"{type(model).__name__} (no ModuleList/Sequential with two or more children of one "
            f"class); set targets to the block class name among {_class_names(model)}."
        )
    return best[1]


def _outermost(model: nn.Module, matched: list[Block]) -> list[Block]:
    """Deduplicate and drop modules nested inside another matched module; keep module order."""
    wanted = {id(m) for _, m in matched}
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules(remove_duplicate=False))}
    chosen: list[Block] = []
    seen: set[int] = set()
    covered: set[int] = set()
    for path, module in sorted(matched, key=lambda pm: order.get(id(pm[1]), 0)):
        if id(module) in seen or id(module) in covered:
            continue
        seen.add(id(module))
        chosen.append((path, module))
        covered.update(id(m) for m in module.modules() if m is not module and id(m) in wanted)
    return [(p, m) for p, m in chosen if id(m) not in covered]


def _class_names(model: nn.Module, limit: int = 12) -> str:
    names = sorted({type(m).__name__ for m in model.modules()})
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")
