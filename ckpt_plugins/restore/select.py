"""Restore: choose what to read, and read only that.

The pipeline is the same for our checkpoints and for foreign ones: a state tree (from the
manifest, or from flattening what a foreign reader returned), a selection on flattened key paths
(``include``/``exclude`` globs), a prefix ``rename``, then only the tensors the selection still
references are read; :mod:`~ckpt_plugins.restore.targets` then loads the result into targets.

Key paths are dict keys and list indices joined with ``.``: ``model.layer.0.weight``,
``optimizer.state.0.exp_avg``. A pattern without wildcards selects a key and everything below it
(``model`` selects ``model.*``). Every ``include``/``exclude`` pattern and every ``rename`` prefix
must match some key of the checkpoint: a typo is a :class:`~ckpt_plugins.errors.ConfigError`
listing the top-level keys that exist, never a silently empty or unfiltered restore.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ckpt_plugins.errors import ConfigError
from ckpt_plugins.options.checks import check_bool
from ckpt_plugins.tree.codec import leaf_paths, rename_tree, select_tree, tensor_refs, unflatten_state

if TYPE_CHECKING:
    from ckpt_plugins.restore.targets import RestoreReport

__all__ = ["Selector", "check_rename", "check_strict", "hoist", "make_selector", "materialize"]


def _pattern_matcher(pattern: str) -> Callable[[str], bool]:
    if any(ch in pattern for ch in "*?["):
        return lambda path: fnmatch.fnmatchcase(path, pattern)
    return lambda path: path == pattern or path.startswith(pattern + ".")


def _patterns(option: str, value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, (bytes, bytearray, Mapping)) or not isinstance(value, Iterable):
        raise ConfigError(
            f"{option} must be a glob pattern on key paths (a str such as 'model.*') or a list "
            f"of them, got {value!r} ({type(value).__name__})"
        )
    else:
        items = list(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigError(
                f"{option} patterns must be non-empty strings such as 'model.*', got {item!r} in {option}={value!r}"
            )
    if not items:
        raise ConfigError(
            f"{option}=[] has no pattern; pass None (the default) to "
            f"{'restore everything' if option == 'include' else 'exclude nothing'}"
        )
    return tuple(items)


@dataclass(frozen=True)
class Selector:
    """``include``/``exclude`` glob patterns on key paths, validated; call it on a key path.

    A pattern without wildcards selects that key and everything below it (``model`` selects
    ``model.*``). Every pattern must match some key of the checkpoint (:meth:`check`), so a typo
    is an error instead of an empty or unfiltered restore.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_inc", [_pattern_matcher(p) for p in self.include])
        object.__setattr__(self, "_exc", [_pattern_matcher(p) for p in self.exclude])

    def __call__(self, path: str) -> bool:
        if self._inc and not any(m(path) for m in self._inc):  # type: ignore[attr-defined]
            return False
        return not any(m(path) for m in self._exc)  # type: ignore[attr-defined]

    def check(self, paths: Iterable[str]) -> None:
        """Raise ConfigError for a pattern that matches none of ``paths`` (the checkpoint's keys)."""
        paths = list(paths)
        for option, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                match = _pattern_matcher(pattern)
                if not any(match(p) for p in paths):
                    raise ConfigError(
                        f"{option} {pattern!r} matches nothing in the checkpoint; {_existing_keys(paths, pattern)}"
                    )


def _existing_keys(paths: Iterable[str], wanted: str) -> str:
    """ "its top-level keys are: a, b (did you mean 'model'?)" for a message about ``wanted``."""
    tops = list(dict.fromkeys(p.split(".", 1)[0] for p in paths))
    if not tops:
        return "the checkpoint holds no keys at all"
    shown = ", ".join(tops[:20]) + (f", ... (+{len(tops) - 20} more)" if len(tops) > 20 else "")
    close = difflib.get_close_matches(wanted.split(".", 1)[0], tops, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close and close[0] != wanted.split(".", 1)[0] else ""
    return f"its top-level keys are: {shown}{hint}. Key paths join keys and indices with '.' (model.fc.weight)."


def make_selector(include: str | Iterable[str] | None, exclude: str | Iterable[str] | None) -> Selector | None:
    """A :class:`Selector`, or None when everything is selected.

    Raises:
        ConfigError: a pattern is not a non-empty str (the message names the option).
    """
    inc, exc = _patterns("include", include), _patterns("exclude", exclude)
    return Selector(inc, exc) if inc or exc else None


def check_rename(rename: Mapping[str, str] | None) -> dict[str, str]:
    """``rename`` as a dict, checked: str prefixes to str prefixes, at most one mapped to ``""``."""
    if rename is None:
        return {}
    if not isinstance(rename, Mapping):
        raise ConfigError(
            f"rename must map old key-path prefixes to new ones, such as {{'model.': 'net.'}}, "
            f"got {rename!r} ({type(rename).__name__})"
        )
    for old, new in rename.items():
        if not isinstance(old, str) or not old or not isinstance(new, str):
            raise ConfigError(f"rename must map non-empty str prefixes to str prefixes, got {old!r}: {new!r}")
    hoists = [old for old, new in rename.items() if new == ""]
    if len(hoists) > 1:
        raise ConfigError(f"rename maps several prefixes to '' ({hoists}); only one can become the root")
    return dict(rename)


def check_strict(strict: Any) -> bool:
    """``strict`` as given, checked by the options model's one bool check."""
    check_bool("strict", strict)
    return bool(strict)


def materialize(
    tree: Any,
    read_tensors: Callable[[set[str] | None], Mapping[str, torch.Tensor]],
    *,
    selector: Callable[[str], bool] | None,
    rename: Mapping[str, str] | None,
    report: RestoreReport,
) -> Any:
    """Select, rename and rebuild the nested state; ``read_tensors(keys)`` reads tensor keys
    (``None`` meaning all of them, which allows one sequential, checksummed read).

    Raises:
        ConfigError: a ``rename`` prefix matches no key of the (selected) state.
    """
    if selector is not None:
        tree = select_tree(tree, selector)
    rules = check_rename(rename)
    if rules:
        paths = leaf_paths(tree)
        for old in rules:
            if not any(p.startswith(old) for p in paths):
                raise ConfigError(
                    f"rename {old!r} matches nothing in the checkpoint"
                    f"{' (after include/exclude)' if selector is not None else ''}; "
                    f"{_existing_keys(paths, old)}"
                )
    renames = {old: new for old, new in rules.items() if new != ""}
    hoists = [old for old, new in rules.items() if new == ""]
    if renames:
        tree = rename_tree(tree, renames)
    needed = set(tensor_refs(tree).values())
    tensors = read_tensors(None if selector is None else needed)
    report.tensors_read = len(needed)
    report.bytes_read = sum(  # sharded refs count what they read, later (sharded.read)
        t.numel() * t.element_size() for k in needed if isinstance(t := tensors.get(k), torch.Tensor)
    )
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
            child = next(
                (k for k in node if rest.startswith(f"{k}.") and isinstance(node[k], (Mapping, list, tuple))), None
            )
            if child is not None:
                node, rest = node[child], rest[len(f"{child}.") :]
                continue
            flat = {k[len(rest) :]: v for k, v in node.items() if isinstance(k, str) and k.startswith(rest)}
            if flat:
                return flat
        elif isinstance(node, (list, tuple)):
            index, _, tail = rest.partition(".")
            if index.isdigit() and int(index) < len(node):
                node, rest = node[int(index)], tail
                continue
        raise ConfigError(f"rename {prefix!r} -> '': nothing in the checkpoint lies under {prefix!r}")
    return node
