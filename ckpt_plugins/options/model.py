"""``ManagerOptions``: every group together, and the one conversion from flat keywords.

``CheckpointManager(directory, keep_last=3, async_save=True)`` and
``CheckpointManager(directory, retention_options=RetentionOptions(keep_last=3),
save_options=SaveOptions(async_save=True))`` build the same :class:`ManagerOptions`;
:func:`assemble` is the only place where flat keywords, group objects and a whole options object
meet, so the rules (no option given twice, the right type per group) live once.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ckpt_plugins.errors import ConfigError
from ckpt_plugins.options.groups import (
    DistributedOptions,
    IOOptions,
    PreemptionOptions,
    RestoreOptions,
    RetentionOptions,
    SaveOptions,
)
from ckpt_plugins.options.mirror import MirrorOptions

if TYPE_CHECKING:
    from ckpt_plugins.retention.policy import RetentionPolicy

__all__ = ["FLAT_DEFAULTS", "GROUP_KEYWORDS", "ManagerOptions", "assemble", "policy_of"]

# ManagerOptions field -> (keyword of CheckpointManager that takes the group, group class)
GROUP_KEYWORDS: dict[str, tuple[str, type]] = {
    "retention": ("retention_options", RetentionOptions),
    "saving": ("save_options", SaveOptions),
    "io": ("io_options", IOOptions),
    "distributed": ("distributed_options", DistributedOptions),
    "restore": ("restore_options", RestoreOptions),
    "mirror": ("mirror_options", MirrorOptions),
    "preemption": ("preemption_options", PreemptionOptions),
}
_GROUP_OF: dict[str, str] = {f.name: group for group, (_, cls) in GROUP_KEYWORDS.items() for f in fields(cls)}
FLAT_DEFAULTS: dict[str, Any] = {f.name: f.default for _, cls in GROUP_KEYWORDS.values() for f in fields(cls)}


@dataclass(frozen=True)
class ManagerOptions:
    """All options of a :class:`~ckpt_plugins.CheckpointManager`, one group per concern.

    Example:
        >>> opts = ManagerOptions.from_flat(keep_last=3, async_save=True)
        >>> opts.retention.keep_last, opts.saving.async_save, opts.io.dir_prefix
        (3, True, 'step_')
    """

    retention: RetentionOptions = field(default_factory=RetentionOptions)
    saving: SaveOptions = field(default_factory=SaveOptions)
    io: IOOptions = field(default_factory=IOOptions)
    distributed: DistributedOptions = field(default_factory=DistributedOptions)
    restore: RestoreOptions = field(default_factory=RestoreOptions)
    mirror: MirrorOptions = field(default_factory=MirrorOptions)
    preemption: PreemptionOptions = field(default_factory=PreemptionOptions)

    def __post_init__(self) -> None:
        for name, (_, cls) in GROUP_KEYWORDS.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise ConfigError(
                    f"ManagerOptions.{name} must be a {cls.__name__}, got {value!r}", option=name, value=value
                )

    @classmethod
    def from_flat(cls, **flat: Any) -> ManagerOptions:
        """Build from flat keywords (the names ``CheckpointManager`` takes); unset ones get defaults.

        Raises:
            TypeError: an unknown keyword (the message names the closest option).
            ConfigError: a value is invalid.
        """
        _check_known(flat)
        groups = {}
        for name, (_, group_cls) in GROUP_KEYWORDS.items():
            groups[name] = group_cls(**{k: v for k, v in flat.items() if _GROUP_OF[k] == name})
        return cls(**groups)

    def flat(self) -> dict[str, Any]:
        """Every option by its flat name (the inverse of :meth:`from_flat`)."""
        return {
            f.name: getattr(getattr(self, group), f.name)
            for group, (_, cls) in GROUP_KEYWORDS.items()
            for f in fields(cls)
        }


def _check_known(flat: Mapping[str, Any]) -> None:
    unknown = [k for k in flat if k not in _GROUP_OF]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, list(_GROUP_OF), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; options are {', '.join(sorted(_GROUP_OF))}"
        raise TypeError(f"CheckpointManager got an unknown option {name!r}{hint}")


def _given(name: str, value: Any) -> bool:
    """Whether a flat keyword differs from its default (``0`` is not the default ``False``)."""
    default = FLAT_DEFAULTS[name]
    return not (value is default or (type(value) is type(default) and value == default))


def assemble(options: ManagerOptions | None, groups: Mapping[str, Any], flat: Mapping[str, Any]) -> ManagerOptions:
    """The options of one manager from what its constructor got.

    Args:
        options: a whole :class:`ManagerOptions` (then nothing else may be given).
        groups: group keyword (``retention_options``, ...) -> group object or None.
        flat: flat keyword -> value, every flat option (defaults included).

    Raises:
        ConfigError: a group of the wrong type, an option given both flat and in its group, or
            ``options`` together with groups or flat options.
    """
    _check_known(flat)
    given_flat = [k for k, v in flat.items() if _given(k, v)]
    given_groups = [k for k, v in groups.items() if v is not None]
    if options is not None:
        if not isinstance(options, ManagerOptions):
            raise ConfigError(f"$options must be a ManagerOptions, got {options!r}", option="options", value=options)
        extra = given_groups + given_flat
        if extra:
            raise ConfigError(
                f"$options holds every option group; pass either options= or {', '.join(extra)}, not both",
                option="options",
                value=options,
            )
        return options
    built = {}
    for name, (keyword, cls) in GROUP_KEYWORDS.items():
        group = groups.get(keyword)
        mine = {k: v for k, v in flat.items() if _GROUP_OF[k] == name}
        if group is None:
            built[name] = cls(**mine)
            continue
        if not isinstance(group, cls):
            raise ConfigError(f"${keyword} must be a {cls.__name__}, got {group!r}", option=keyword, value=group)
        clash = [k for k in mine if k in given_flat]
        if clash:
            raise ConfigError(
                f"${clash[0]}={mine[clash[0]]!r} and ${keyword} are both given; set {clash[0]} "
                f"inside {keyword} ({cls.__name__}) or drop {keyword}",
                option=clash[0],
                value=mine[clash[0]],
                mentions=(keyword,),
            )
        built[name] = group
    return ManagerOptions(**built)


def policy_of(policy: Any, retention: RetentionOptions) -> RetentionPolicy:
    """A ready ``policy`` (then no ``keep_*`` option may be set), else the one ``retention`` stands for."""
    from ckpt_plugins.retention.policy import RetentionPolicy

    if policy is None:
        return retention.policy()
    if not isinstance(policy, RetentionPolicy):
        raise ConfigError(
            f"$policy must be a RetentionPolicy (ckpt_plugins.retention), got {policy!r}", option="policy", value=policy
        )
    if retention.has_rules:
        rules = [
            f"{n}={getattr(retention, n)!r}"
            for n in ("keep_last", "keep_best", "keep_every_n_steps", "keep_time_interval")
            if getattr(retention, n) is not None
        ]
        raise ConfigError(
            f"$policy replaces the keep_* rules, and {', '.join(rules)} is set too; put that rule "
            "in the policy or drop policy=",
            option="policy",
            value=policy,
        )
    return policy
