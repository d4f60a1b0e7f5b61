"""Load what a restore read into targets, in place, with checks.

A target names what to fill: tensors, dicts and lists of them, ``nn.Module``s, optimizers and
anything with ``state_dict``/``load_state_dict``. Each filled key is checked for kind, shape and
dtype, for every kind of target (a float64 checkpoint does not load into a float32 module).
``strict=True`` checks everything before changing anything and fails on a missing or mismatched
target key; ``strict=False`` loads what matches and leaves the rest as it is (a mismatch is
skipped, never cast). Checkpoint keys that no target names are returned to the caller, listed in
:attr:`RestoreReport.unexpected`, and never fail a restore: saving ``capture_rng()`` and the step
beside the model and optimizer and restoring into ``{"model": model, "optimizer": opt}`` is the
documented resume.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_plugins.errors import RestoreError
from ckpt_plugins.files.tensor_file import is_mapped
from ckpt_plugins.restore.select import check_strict
from ckpt_plugins.sharded.read import ShardedRef, resolve_like
from ckpt_plugins.tree.walk import join, state_children

__all__ = ["RestoreReport", "load_into"]

log = logging.getLogger(__name__)


@dataclass
class RestoreReport:
    """What a restore did: where from, which step, and which keys were loaded, missing, unexpected
    or mismatched.

    Attributes:
        step: the step of the checkpoint that was read (None for a foreign file without one). A
            resume continues from here: after a fallback past a damaged newest checkpoint this is
            the older step, not ``latest_step()``.
        loaded: target keys filled from the checkpoint.
        missing: target keys the checkpoint does not have (a strict restore fails).
        mismatched: target keys whose shape, dtype or kind differs (a strict restore fails; a
            tolerant one leaves them as they are); ``details`` says how for each.
        unexpected: checkpoint keys no target asks for; they are returned, not loaded, and never
            fail a restore (a target names what to fill).
    """

    source: str = ""
    step: int | None = None
    format: str = "ckpt_plugins"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    tensors_read: int = 0
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        """Every target key was filled with a value of matching shape and dtype."""
        return not (self.missing or self.mismatched)

    def summary(self) -> str:
        return (
            f"restored {self.source} ({self.format}, step {self.step}): {len(self.loaded)} keys "
            f"loaded, {len(self.missing)} missing, {len(self.mismatched)} mismatched, "
            f"{len(self.unexpected)} not asked for; {self.tensors_read} tensors / "
            f"{self.bytes_read / 2**20:.1f} MiB read"
        )

    def _mismatch(self, path: str, why: str) -> None:
        key = path or "<root>"
        self.mismatched.append(key)
        self.details[key] = why


def load_into(target: Any, loaded: Any, *, strict: bool, report: RestoreReport) -> None:
    """Copy ``loaded`` into ``target`` in place.

    The target names what to fill: tensors, dicts and lists of them, modules, optimizers and
    anything with ``state_dict``/``load_state_dict``. Every filled key is checked for kind, shape
    and dtype. Strict mode checks everything before changing anything and fails on missing or
    mismatched target keys, so a failed strict restore leaves the target untouched; tolerant mode
    loads what matches and leaves the rest as it is (a dtype mismatch is skipped, never cast).
    Checkpoint keys no target names are listed in ``report.unexpected`` and never fail.

    Raises:
        RestoreError: ``strict`` and a target key is missing or mismatched (``key_path`` names it
            when it is the only one; ``report`` lists them all).
    """
    check_strict(strict)
    _fill(target, loaded, "", report, apply=False)
    if strict and not report.ok:
        faults = report.missing + report.mismatched
        raise RestoreError(_strict_message(report), key_path=faults[0] if len(faults) == 1 else None, report=report)
    for found in (report.loaded, report.missing, report.unexpected, report.mismatched):
        found.clear()
    report.details.clear()
    _fill(target, loaded, "", report, apply=True)
    if not report.ok:
        log.warning("tolerant restore: %s", report.summary())
    elif report.unexpected:
        log.info("restore from %s: not loaded (no target asks for them): %s", report.source, _shown(report.unexpected))


def _shown(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _strict_message(report: RestoreReport) -> str:
    lines = [f"restore from {report.source} does not fill the target (strict=True):"]
    if report.missing:
        lines.append(f"  missing in checkpoint: {_shown(report.missing)}")
    if report.mismatched:
        shown = [f"{k} ({report.details[k]})" for k in report.mismatched]
        lines.append(f"  shape/dtype mismatch: {_shown(shown)}")
    if report.missing and report.unexpected:  # often the same keys under other names
        lines.append(f"  (in the checkpoint but asked for by no target, not a failure: {_shown(report.unexpected)})")
    if report.missing and not report.loaded and report.unexpected:
        lines.append(
            "Nothing matched: to load what lies under one key of the checkpoint into this target, "
            "pass rename={'<key>.': ''} (for example rename={'model.': ''})."
        )
    lines.append("Pass strict=False to load what matches, or include/exclude/rename to select keys.")
    return "\n".join(lines)


def _is_stateful(value: Any) -> bool:
    return hasattr(value, "load_state_dict") and hasattr(value, "state_dict")


def _fill(target: Any, loaded: Any, path: str, report: RestoreReport, apply: bool) -> None:
    if isinstance(target, torch.nn.Module):
        _load_module(target, loaded, path, report, apply)
    elif isinstance(target, torch.optim.Optimizer):
        _load_optimizer(target, loaded, path, report, apply)
    elif _is_stateful(target):  # schedulers, anything with the state_dict protocol: all or nothing
        if not isinstance(loaded, Mapping):
            report._mismatch(path, f"expected a state dict, got {type(loaded).__name__}")
        else:
            if apply:
                target.load_state_dict(loaded)
            report.loaded.append(path or "<root>")
    elif isinstance(target, torch.Tensor):
        _load_tensor(target, loaded, path, report, apply)
    elif isinstance(target, (dict, list)):
        _load_container(target, loaded, path, report, apply)
    else:
        report._mismatch(
            path, f"cannot load into a {type(target).__name__}; pass a dict, list, tensor, module or optimizer"
        )


def _load_container(
    target: dict[Any, Any] | list[Any], loaded: Any, path: str, report: RestoreReport, apply: bool
) -> None:
    kind = (Mapping, "a mapping") if isinstance(target, dict) else ((list, tuple), "a sequence")
    if not isinstance(loaded, kind[0]):
        report._mismatch(path, f"expected {kind[1]}, got {type(loaded).__name__}")
        return
    present = (lambda k: k in loaded) if isinstance(target, dict) else (lambda i: i < len(loaded))
    for key, _seg, value in state_children(target) or []:
        full = join(path, key)
        if not present(key):
            report.missing.append(full)
        elif isinstance(value, (torch.Tensor, torch.nn.Module, dict, list)) or _is_stateful(value):
            _fill(value, loaded[key], full, report, apply)
        else:
            if apply:
                target[key] = _keep(loaded, key, resolve_like(loaded[key], value))
            report.loaded.append(full)
    if isinstance(target, dict):
        report.unexpected.extend(join(path, k) for k in loaded if k not in target)
    else:
        report.unexpected.extend(join(path, i) for i in range(len(target), len(loaded)))


def _keep(loaded: Any, key: Any, value: Any) -> Any:
    """Put a value read for a target back into the state restore returns (a sharded tensor is
    then not read again in full)."""
    if isinstance(loaded, (dict, list)):
        loaded[key] = value
    return value


def _tensor_mismatch(loaded: Any, own: torch.Tensor) -> str | None:
    if not isinstance(loaded, (torch.Tensor, ShardedRef)):
        return f"checkpoint holds a {type(loaded).__name__}, target a tensor"
    if loaded.shape != own.shape or loaded.dtype != own.dtype:
        return f"checkpoint {tuple(loaded.shape)} {loaded.dtype}, target {tuple(own.shape)} {own.dtype}"
    return None


def _load_tensor(target: torch.Tensor, loaded: Any, path: str, report: RestoreReport, apply: bool) -> None:
    why = _tensor_mismatch(loaded, target)
    if why is not None:
        report._mismatch(path, why)
        return
    if apply:
        with torch.no_grad():
            target.copy_(resolve_like(loaded, target))
    report.loaded.append(path)


def _load_module(module: torch.nn.Module, loaded: Any, path: str, report: RestoreReport, apply: bool) -> None:
    if not isinstance(loaded, Mapping):
        report._mismatch(path, f"expected a state dict, got {type(loaded).__name__}")
        return
    own = module.state_dict()
    usable, extra = {}, []
    for key, value in loaded.items():
        full = join(path, key)
        if key not in own:
            extra.append(full)
            continue
        why = _tensor_mismatch(value, own[key]) if isinstance(own[key], torch.Tensor) else None
        if why is not None:
            report._mismatch(full, why)
        else:
            usable[key] = value
            report.loaded.append(full)
    report.missing.extend(join(path, k) for k in own if k not in loaded)
    report.unexpected.extend(extra)
    if apply:
        for key, value in usable.items():  # sharded: read (or sliced) in the module's own layout
            resolved = resolve_like(value, own[key])
            if resolved is not value:
                usable[key] = _keep(loaded, key, resolved)
        if extra:
            log.warning(
                "restore into the module at %r: the checkpoint has keys the module does not; they were not loaded: %s",
                path or "<root>",
                _shown(extra),
            )
        module.load_state_dict(usable, strict=False)


def _load_optimizer(opt: torch.optim.Optimizer, loaded: Any, path: str, report: RestoreReport, apply: bool) -> None:
    """All or nothing, after the checks ``Optimizer.load_state_dict`` would skip or fail halfway:
    the same parameter groups and sizes, and each state tensor in the dtype (and, where the
    optimizer already holds state, the shape) it would be cast to. torch casts floating-point
    state to its parameter's dtype silently; here a different dtype is a mismatch."""
    label = path or "<root>"
    if (
        not isinstance(loaded, Mapping)
        or not isinstance(loaded.get("param_groups"), (list, tuple))
        or not isinstance(loaded.get("state"), Mapping)
    ):
        report._mismatch(path, "expected an optimizer state dict with 'state' and 'param_groups'")
        return
    own = opt.state_dict()
    sizes = [len(g.get("params", ())) if isinstance(g, Mapping) else -1 for g in loaded["param_groups"]]
    own_sizes = [len(g["params"]) for g in own["param_groups"]]
    if sizes != own_sizes:
        report._mismatch(path, f"checkpoint has parameter groups of sizes {sizes}, the optimizer {own_sizes}")
        return
    params = {}  # checkpoint param id -> (own param id, parameter)
    for group, own_group, live in zip(loaded["param_groups"], own["param_groups"], opt.param_groups, strict=False):
        params.update(
            {pid: (oid, p) for pid, oid, p in zip(group["params"], own_group["params"], live["params"], strict=False)}
        )
    ok = True
    for pid, entry in loaded["state"].items():
        if pid not in params:
            report._mismatch(join(join(path, "state"), pid), "state for a parameter id no group lists")
            ok = False
            continue
        oid, param = params[pid]
        own_entry = own["state"].get(oid, {})
        for name, value in entry.items() if isinstance(entry, Mapping) else ():
            full = join(join(join(path, "state"), pid), name)
            if not isinstance(value, (torch.Tensor, ShardedRef)):
                continue
            if isinstance(own_entry.get(name), torch.Tensor):
                why = _tensor_mismatch(value, own_entry[name])
            elif name != "step" and value.dtype.is_floating_point and value.dtype != param.dtype:
                why = f"checkpoint {value.dtype}, parameter {param.dtype} (torch would cast it silently)"
            else:
                why = None
            if why is not None:
                report._mismatch(full, why)
                ok = False
    if not ok:
        return
    if apply:
        _resolve_optimizer_state(loaded, params, own["state"])
        opt.load_state_dict(dict(loaded))
    report.loaded.append(label)


def _resolve_optimizer_state(loaded: Any, params: Mapping[Any, tuple[Any, Any]], own_state: Mapping[Any, Any]) -> None:
    """Put the state tensors of an optimizer in the layout of what they will live beside: the
    optimizer's own state tensor when it has one, else its parameter when the shapes agree (a
    fresh optimizer with no step taken has no state yet), else the whole tensor. Sharded ones are
    read so; full plain ones are sliced so when the parameter is a DTensor.

    Where the optimizer has a plain state tensor of its own, the checkpoint's is copied into it
    (``load_state_dict`` then keeps it: the only copy). A tensor backed by a mapping of the file
    (:func:`~ckpt_plugins.files.tensor_file.is_mapped`) with no such home is cloned, so that the
    optimizer owns its memory rather than a private mapping of a checkpoint that retention may
    delete."""
    for pid, entry in loaded["state"].items():
        if not isinstance(entry, dict):
            continue
        oid, param = params[pid]
        for name, value in entry.items():
            if not isinstance(value, (torch.Tensor, ShardedRef)):
                continue
            own = own_state.get(oid, {}).get(name)
            template = own if isinstance(own, torch.Tensor) else param
            if tuple(template.shape) == tuple(value.shape):
                entry[name] = resolve_like(value, template)
            elif isinstance(value, ShardedRef):
                entry[name] = value.full()
            entry[name] = _owned(entry[name], own)


def _owned(value: Any, own: Any) -> Any:
    """``value`` in memory the optimizer owns: copied into ``own`` (same kind, shape and dtype:
    checked before), or cloned out of a file mapping; anything else as it is."""
    if type(value) is not torch.Tensor:
        return value
    if type(own) is torch.Tensor and own.shape == value.shape and own.dtype == value.dtype:
        with torch.no_grad():
            own.copy_(value)
        return own
    return value.clone() if is_mapped(value) else value
