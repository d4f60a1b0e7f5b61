"""Restore: choose what to read, read only that, and load it into a target with checks.

The pipeline is the same for our checkpoints and for foreign ones: a state tree (from the
manifest, or from flattening what a foreign reader returned), a selection on flattened key paths
(``include``/``exclude`` globs), a prefix ``rename``, then only the tensors the selection still
references are read. With a ``target`` the result is copied into it in place, after shape and
dtype checks; ``strict=False`` tolerates missing, unexpected and mismatched keys and says so in a
:class:`RestoreReport`.

Key paths are dict keys and list indices joined with ``.``: ``model.layer.0.weight``,
``optimizer.state.0.exp_avg``. A pattern without wildcards selects a key and everything below it
(``model`` selects ``model.*``).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_plugins.errors import ConfigError, RestoreError
from ckpt_plugins.tree.codec import rename_tree, select_tree, tensor_refs, unflatten_state

__all__ = ["RestoreReport", "make_selector", "materialize", "load_into", "hoist"]

log = logging.getLogger(__name__)


@dataclass
class RestoreReport:
    """What a restore did: where from, and which keys were loaded, missing, unexpected, mismatched."""

    source: str = ""
    step: int | None = None
    format: str = "ckpt_plugins"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    tensors_read: int = 0
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        return (f"restored {self.source} ({self.format}, step {self.step}): {len(self.loaded)} keys "
                f"loaded, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                f"{len(self.mismatched)} mismatched; {self.tensors_read} tensors / "
                f"{self.bytes_read / 2**20:.1f} MiB read")


def _pattern_matcher(pattern: str) -> Callable[[str], bool]:
    if any(ch in pattern for ch in "*?["):
        return lambda path: fnmatch.fnmatchcase(path, pattern)
    return lambda path: path == pattern or path.startswith(pattern + ".")


def make_selector(include: str | Iterable[str] | None,
                  exclude: str | Iterable[str] | None) -> Callable[[str], bool] | None:
    """A predicate on key paths, or None when everything is selected."""
    inc = [include] if isinstance(include, str) else list(include or [])
    exc = [exclude] if isinstance(exclude, str) else list(exclude or [])
    if not inc and not exc:
        return None
    inc_m = [_pattern_matcher(p) for p in inc]
    exc_m = [_pattern_matcher(p) for p in exc]

    def select(path: str) -> bool:
        if inc_m and not any(m(path) for m in inc_m):
            return False
        return not any(m(path) for m in exc_m)

    return select


def materialize(tree: Any, read_tensors: Callable[[set[str] | None], Mapping[str, torch.Tensor]], *,
                selector: Callable[[str], bool] | None, rename: Mapping[str, str] | None,
                report: RestoreReport) -> Any:
    """Select, rename and rebuild the nested state; ``read_tensors(keys)`` reads tensor keys
    (``None`` meaning all of them, which allows one sequential, checksummed read)."""
    if selector is not None:
        tree = select_tree(tree, selector)
    renames = {old: new for old, new in (rename or {}).items() if new != ""}
    hoists = [old for old, new in (rename or {}).items() if new == ""]
    if len(hoists) > 1:
        raise ConfigError(f"rename maps several prefixes to '' ({hoists}); only one can become the root")
    if renames:
        tree = rename_tree(tree, renames)
    needed = set(tensor_refs(tree).values())
    tensors = read_tensors(None if selector is None else needed)
    report.tensors_read = len(needed)
    report.bytes_read = sum(tensors[k].numel() * tensors[k].element_size() for k in needed if k in tensors)
    state = unflatten_state(tree, tensors)
    return hoist(state, hoists[0]) if hoists else state


def hoist(state: Any, prefix: str) -> Any:
    """``rename={prefix: ""}``: make what lies under ``prefix`` the root.

    ``"model."`` returns ``state["model"]``; ``"state_dict.model."`` on a Lightning checkpoint
    enters ``state_dict`` and strips ``model.`` from its flat keys (``model.fc.weight`` becomes
    ``fc.weight``), which is how a LightningModule's weights load into the bare network.
    """
    rest = prefix if prefix.endswith(".") else prefix + "."
    node = state
    while rest:
        if isinstance(node, Mapping):
            child = next((k for k in node if rest.startswith(f"{k}.") and
                          isinstance(node[k], (Mapping, list, tuple))), None)
            if child is not None:
                node, rest = node[child], rest[len(f"{child}."):]
                continue
            flat = {k[len(rest):]: v for k, v in node.items() if isinstance(k, str) and k.startswith(rest)}
            if flat:
                return flat
        elif isinstance(node, (list, tuple)):
            index, _, tail = rest.partition(".")
            if index.isdigit() and int(index) < len(node):
                node, rest = node[int(index)], tail
                continue
        raise ConfigError(f"rename {prefix!r} -> '': nothing in the checkpoint lies under {prefix!r}")
    return node


def load_into(target: Any, loaded: Any, *, strict: bool, report: RestoreReport) -> None:
    """Copy ``loaded`` into ``target`` in place. Strict mode checks everything before changing
    anything, so a failed strict restore leaves the target untouched."""
    _walk(target, loaded, "", report, apply=False)
    if strict and not report.ok:
        raise RestoreError(_strict_message(report))
    report.loaded.clear()
    report.missing.clear()
    report.unexpected.clear()
    report.mismatched.clear()
    _walk(target, loaded, "", report, apply=True)
    if not report.ok:
        log.warning("tolerant restore: %s", report.summary())


def _strict_message(report: RestoreReport) -> str:
    lines = [f"restore from {report.source} does not match the target (strict=True):"]
    for label, keys in (("missing in checkpoint", report.missing),
                        ("unexpected in checkpoint", report.unexpected),
                        ("shape/dtype mismatch", report.mismatched)):
        if keys:
            shown = ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")
            lines.append(f"  {label}: {shown}")
    lines.append("Pass strict=False to load what matches, or include/exclude/rename to select keys.")
    return "\n".join(lines)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _walk(target: Any, loaded: Any, path: str, report: RestoreReport, apply: bool) -> None:
    if isinstance(target, torch.nn.Module):
        _load_module(target, loaded, path, report, apply)
    elif hasattr(target, "load_state_dict") and hasattr(target, "state_dict"):
        # Optimizers, schedulers, anything with the state_dict protocol: all or nothing.
        if not isinstance(loaded, Mapping):
            report.mismatched.append(f"{path or '<root>'} (expected a state dict, got {type(loaded).__name__})")
        elif apply:
            target.load_state_dict(loaded)
            report.loaded.append(path or "<root>")
    elif isinstance(target, torch.Tensor):
        _load_tensor(target, loaded, path, report, apply)
    elif isinstance(target, dict):
        if not isinstance(loaded, Mapping):
            report.mismatched.append(f"{path or '<root>'} (expected a mapping, got {type(loaded).__name__})")
            return
        for key, value in target.items():
            if key not in loaded:
                report.missing.append(_join(path, key))
            elif isinstance(value, (torch.Tensor, torch.nn.Module, dict, list)) or hasattr(value, "load_state_dict"):
                _walk(value, loaded[key], _join(path, key), report, apply)
            else:
                if apply:
                    target[key] = loaded[key]
                report.loaded.append(_join(path, key))
        report.unexpected.extend(_join(path, k) for k in loaded if k not in target)
    elif isinstance(target, list):
        if not isinstance(loaded, (list, tuple)):
            report.mismatched.append(f"{path or '<root>'} (expected a sequence, got {type(loaded).__name__})")
            return
        for i, value in enumerate(target):
            if i >= len(loaded):
                report.missing.append(_join(path, i))
            elif isinstance(value, (torch.Tensor, torch.nn.Module, dict, list)) or hasattr(value, "load_state_dict"):
                _walk(value, loaded[i], _join(path, i), report, apply)
            else:
                if apply:
                    target[i] = loaded[i]
                report.loaded.append(_join(path, i))
        report.unexpected.extend(_join(path, i) for i in range(len(target), len(loaded)))
    else:
        report.mismatched.append(f"{path or '<root>'} (cannot load into a {type(target).__name__}; "
                                 "pass a dict, list, tensor, module or optimizer)")


def _load_tensor(target: torch.Tensor, loaded: Any, path: str, report: RestoreReport, apply: bool) -> None:
    if not isinstance(loaded, torch.Tensor):
        report.mismatched.append(f"{path} (checkpoint holds a {type(loaded).__name__}, target a tensor)")
    elif loaded.shape != target.shape or loaded.dtype != target.dtype:
        report.mismatched.append(f"{path} (checkpoint {tuple(loaded.shape)} {loaded.dtype}, "
                                 f"target {tuple(target.shape)} {target.dtype})")
    else:
        if apply:
            with torch.no_grad():
                target.copy_(loaded)
        report.loaded.append(path)


def _load_module(module: torch.nn.Module, loaded: Any, path: str, report: RestoreReport, apply: bool) -> None:
    if not isinstance(loaded, Mapping):
        report.mismatched.append(f"{path or '<root>'} (expected a state dict, got {type(loaded).__name__})")
        return
    own = module.state_dict()
    usable = {}
    for key, value in loaded.items():
        full = _join(path, key)
        if key not in own:
            report.unexpected.append(full)
        elif isinstance(value, torch.Tensor) and (value.shape != own[key].shape):
            report.mismatched.append(f"{full} (checkpoint {tuple(value.shape)}, target {tuple(own[key].shape)})")
        else:
            usable[key] = value
            report.loaded.append(full)
    report.missing.extend(_join(path, k) for k in own if k not in loaded)
    if apply:
        module.load_state_dict(usable, strict=False)
