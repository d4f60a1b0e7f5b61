"""Which checkpoints to keep: a pure decision over checkpoint records.

Each rule is a small frozen dataclass with one method, ``keep(records, ctx) -> set[int]``, that
names the steps it wants to keep. A :class:`RetentionPolicy` keeps a step if ANY rule keeps it and
deletes the rest. Nothing here touches the file system or reads the clock: the current time and
the protected steps arrive in a :class:`RetentionContext`, so the decision is a function of its
arguments and tests need no patching. Users write flags (``keep_last=3``); :func:`build_policy`
turns them into rules once.

Every rule has a stable ``reason`` string; ``ckpt-plugins ls`` shows these to users, so they are
part of the public interface: ``latest``, ``best``, ``keep_last``, ``keep_best``,
``keep_every_n_steps``, ``keep_time_interval``, ``protected``, ``keep_all``.

Example:
    >>> policy = build_policy(keep_last=1, monitor="loss")
    >>> records = [CheckpointRecord(1, 0.0, {"loss": 0.5}), CheckpointRecord(2, 1.0, {"loss": 0.9}),
    ...            CheckpointRecord(3, 2.0, {"loss": 0.7})]
    >>> decision = policy.decide(records, RetentionContext(now=3.0))
    >>> decision.keep, decision.delete
    ({1: ['best'], 3: ['keep_last', 'latest']}, [2])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from ckpt_plugins.errors import ConfigError
from ckpt_plugins.options.checks import check_metric, check_mode, check_positive_int, check_seconds

if TYPE_CHECKING:
    from ckpt_plugins.options.groups import RetentionOptions

__all__ = [
    "CheckpointRecord",
    "KeepAll",
    "KeepBest",
    "KeepBestOne",
    "KeepEveryNSteps",
    "KeepLast",
    "KeepLatest",
    "KeepProtected",
    "KeepTimeInterval",
    "RetentionContext",
    "RetentionDecision",
    "RetentionPolicy",
    "RetentionRule",
    "best_step",
    "build_policy",
    "policy_flags",
    "policy_for",
    "ranked_steps",
]


@dataclass(frozen=True)
class CheckpointRecord:
    """What retention knows about one committed checkpoint: its step (unique in a list of
    records), ``wall_time`` (seconds since the epoch when it committed) and logged ``metrics``."""

    step: int
    wall_time: float
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RetentionContext:
    """What a decision needs besides records: ``now`` (seconds since the epoch; rules read the
    time here, never from the clock) and ``protected_steps``, never deleted (e.g. the step this
    manager restored from)."""

    now: float
    protected_steps: frozenset[int] = frozenset()


@runtime_checkable
class RetentionRule(Protocol):
    """One reason to keep checkpoints: ``keep`` returns the steps (of ``records``) it keeps."""

    reason: ClassVar[str]

    def keep(self, records: Sequence[CheckpointRecord], ctx: RetentionContext) -> set[int]: ...


@dataclass(frozen=True)
class RetentionDecision:
    """The outcome: kept steps with their reasons (ascending), and steps to delete (ascending)."""

    keep: dict[int, list[str]]
    delete: list[int]


def _ranked(records: Sequence[CheckpointRecord], monitor: str, mode: str) -> list[int]:
    """Steps that carry ``monitor``, best first. NaN ranks last; ties go to the later step."""
    sign = 1.0 if mode == "min" else -1.0

    def rank(record: CheckpointRecord) -> tuple[bool, float, int]:
        value = float(record.metrics[monitor])
        nan = math.isnan(value)
        return (nan, 0.0 if nan else sign * value, -record.step)

    return [r.step for r in sorted((r for r in records if monitor in r.metrics), key=rank)]


def ranked_steps(records: Sequence[CheckpointRecord], monitor: str, mode: str = "min") -> list[int]:
    """Steps that carry ``monitor``, best first, ranked as in :func:`best_step` (``restore("best")``
    tries them in this order, past damaged ones)."""
    check_metric("monitor", monitor)
    check_mode("mode", mode)
    return _ranked(records, monitor, mode)


def best_step(records: Sequence[CheckpointRecord], monitor: str, mode: str = "min") -> int | None:
    """Return the step with the best ``monitor`` value, or ``None`` if no record has the metric.

    Records without the metric are never best. NaN ranks below every real value (in both modes),
    so a NaN step is returned only when every record with the metric is NaN. Ties go to the more
    recent (higher) step: it holds the most training for the same score.

    Raises:
        ConfigError: ``mode`` is not ``"min"``/``"max"``, or ``monitor`` is empty.

    Example:
        >>> records = [CheckpointRecord(1, 0.0, {"acc": 0.9}),
        ...            CheckpointRecord(2, 9.0, {"acc": 0.9})]
        >>> best_step(records, "acc", "max")
        2
    """
    check_metric("monitor", monitor)
    check_mode("mode", mode)
    ranked = _ranked(records, monitor, mode)
    return ranked[0] if ranked else None


@dataclass(frozen=True)
class KeepAll:
    """Keeps every checkpoint (what a policy with no user rules does)."""

    reason: ClassVar[str] = "keep_all"

    def keep(self, records: Sequence[CheckpointRecord], ctx: RetentionContext) -> set[int]:
        return {r.step for r in records}


@dataclass(frozen=True)
class KeepLatest:
    """Keeps the latest checkpoint (highest step), so a resume always has somewhere to start."""

    reason: ClassVar[str] = "latest"

    def keep(self, records: Sequence[CheckpointRecord], ctx: RetentionContext) -> set[int]:
        return {max(r.step for r in records)} if records else set()


@dataclass(frozen=True)
class KeepProtected:
    """Keeps the steps named in ``ctx.protected_steps`` (those present in ``records``)."""

    reason: ClassVar[str] = "protected"

    def keep(self, records: Sequence[CheckpointRecord], ctx: RetentionContext) -> set[int]:
        return {r.step for r in records if r.step in ctx.protected_steps}


@dataclass(frozen=True)
class KeepLast:
    """Keeps the ``n`` most recent checkpoints, by step number (flag ``keep_last``)."""

    n: int
    reason: ClassVar[str] = "keep_last"

    def __post_init__(self) -> None:
        check_positive_int("keep_last (KeepLast.n)", self.n)

    def keep(self, records: Sequence[CheckpointRecord], ctx: RetentionContext) -> set[int]:
        return set(sorted((r.step for r in records), reverse=True)[: self.n])


@dataclass(frozen=True)
class KeepBest:
    """Keeps the ``n`` best checkpoints by ``monitor``, ranked as in :func:`best_step`."""

    n: int
    monitor: str
    mode: str = "min"
    reason: ClassVar[str] = "keep_best"

    def __post_init__(self) -> None:
        check_positive_int("keep_best (KeepBest.n)", self.n)
        check_metric("monitor (KeepBest)", self.monitor)
        check_mode("mode (KeepBest)", self.mode)

    def keep(self, records: Sequence[CheckpointRecord], ctx: RetentionContext) -> set[int]:
        return set(_ranked(records, self.monitor, self.mode)[: self.n])


@dataclass(frozen=True)
class KeepBestOne:
    """Keeps the single best checkpoint by ``monitor`` (the one :func:`best_step` returns)."""

    monitor: str
    mode: str = "min"
    reason: ClassVar[str] = "best"

    def __post_init__(self) -> None:
        check_metric("monitor (KeepBestOne)", self.monitor)
        check_mode("mode (KeepBestOne)", self.mode)

    def keep(self, records: Sequence[CheckpointRecord], ctx: RetentionContext) -> set[int]:
        step = best_step(records, self.monitor, self.mode)
        return set() if step is None else {step}


@dataclass(frozen=True)
class KeepEveryNSteps:
    """Keeps, for good, every checkpoint whose step is divisible by ``n`` (step 0 included)."""

    n: int
    reason: ClassVar[str] = "keep_every_n_steps"

    def __post_init__(self) -> None:
        check_positive_int("keep_every_n_steps (KeepEveryNSteps.n)", self.n)

    def keep(self, records: Sequence[CheckpointRecord], ctx: RetentionContext) -> set[int]:
        return {r.step for r in records if r.step % self.n == 0}


@dataclass(frozen=True)
class KeepTimeInterval:
    """Keeps the first checkpoint committed in each ``seconds``-long interval of wall time.

    Intervals are anchored at the oldest record's ``wall_time`` ``t0``: a record falls in bucket
    ``floor((wall_time - t0) / seconds)``, and the earliest record of each bucket is kept (equal
    times: the lower step). The oldest record is always the first of bucket 0, so this rule keeps
    it, and the anchor stays put from one decision to the next.
    """

    seconds: float
    reason: ClassVar[str] = "keep_time_interval"

    def __post_init__(self) -> None:
        check_seconds("keep_time_interval (KeepTimeInterval.seconds)", self.seconds)

    def keep(self, records: Sequence[CheckpointRecord], ctx: RetentionContext) -> set[int]:
        first: dict[int, CheckpointRecord] = {}
        if records:
            t0 = min(r.wall_time for r in records)
            for r in sorted(records, key=lambda r: (r.wall_time, r.step)):
                first.setdefault(math.floor((r.wall_time - t0) / self.seconds), r)
        return {r.step for r in first.values()}


_SAFETY_RULES: tuple[RetentionRule, ...] = (KeepLatest(), KeepProtected())


@dataclass(frozen=True)
class RetentionPolicy:
    """Keeps a step if ANY rule keeps it; deletes the others.

    The latest step and ``ctx.protected_steps`` are always kept: :attr:`effective_rules` appends
    :class:`KeepLatest` and :class:`KeepProtected` when ``rules`` lacks them (``rules`` itself is
    never changed). Nothing else is kept unless a rule says so; :func:`build_policy` with no
    options, or ``RetentionPolicy((KeepAll(),))``, keeps everything.
    """

    rules: tuple[RetentionRule, ...]

    def __post_init__(self) -> None:
        ok = isinstance(self.rules, tuple) and self.rules
        if not ok or not all(isinstance(rule, RetentionRule) for rule in self.rules):
            raise ConfigError(
                f"RetentionPolicy.rules must be a non-empty tuple of rules (each with a `reason` "
                f"and a `keep(records, ctx)` method), got {self.rules!r}; "
                "use (KeepAll(),) to keep every checkpoint"
            )

    @property
    def effective_rules(self) -> tuple[RetentionRule, ...]:
        """``rules`` followed by the safety rules (latest, protected) that ``rules`` lacks."""
        present = {type(rule) for rule in self.rules}
        return self.rules + tuple(r for r in _SAFETY_RULES if type(r) not in present)

    def decide(self, records: Sequence[CheckpointRecord], ctx: RetentionContext) -> RetentionDecision:
        """Split ``records`` (any order) into kept steps, with reasons in rule order, and deletes.

        A step that some rule keeps is kept; steps a rule names that are not in ``records`` are
        ignored.

        Raises:
            ValueError: two records share a step (a bug in the caller).
        """
        steps = sorted(r.step for r in records)
        duplicates = sorted({a for a, b in itertools.pairwise(steps) if a == b})
        if duplicates:
            raise ValueError(f"records must have unique steps; duplicated steps: {duplicates}")
        reasons: dict[int, list[str]] = {}
        for rule in self.effective_rules:
            for step in rule.keep(records, ctx):
                reasons.setdefault(step, []).append(rule.reason)
        keep = {step: reasons[step] for step in steps if step in reasons}
        return RetentionDecision(keep=keep, delete=[s for s in steps if s not in reasons])


def build_policy(
    *,
    keep_last: int | None = None,
    keep_best: int | None = None,
    monitor: str | None = None,
    mode: str = "min",
    keep_every_n_steps: int | None = None,
    keep_time_interval: float | timedelta | None = None,
) -> RetentionPolicy:
    """Turn user flags into a :class:`RetentionPolicy` (the flags are those of
    :class:`~ckpt_plugins.options.RetentionOptions`, checked there; see :func:`policy_for`).

    Raises:
        ConfigError: an option has an invalid value (the message names it and shows the value).
    """
    from ckpt_plugins.options.groups import RetentionOptions

    return policy_for(
        RetentionOptions(
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,  # type: ignore[arg-type] # checked there
            keep_every_n_steps=keep_every_n_steps,
            keep_time_interval=keep_time_interval,
        )
    )


def policy_for(options: RetentionOptions) -> RetentionPolicy:
    """The one place flags become rules.

    Rules, in order (the order of reasons in a decision): ``keep_last``, ``keep_best``,
    ``keep_every_n_steps``, ``keep_time_interval``, then the always-kept ``latest``, ``best``
    (when ``monitor`` is set, even without ``keep_best``) and ``protected``. With none of the
    four ``keep_*`` options (``monitor`` alone included), every checkpoint is kept (``keep_all``).
    """
    rules: list[RetentionRule] = []
    if options.keep_last is not None:
        rules.append(KeepLast(options.keep_last))
    if options.keep_best is not None and options.monitor is not None:
        rules.append(KeepBest(options.keep_best, options.monitor, options.mode))
    if options.keep_every_n_steps is not None:
        rules.append(KeepEveryNSteps(options.keep_every_n_steps))
    interval = options.interval_s
    if interval is not None:
        rules.append(KeepTimeInterval(interval))
    if not rules:
        rules.append(KeepAll())
    rules.append(KeepLatest())
    if options.monitor is not None:
        rules.append(KeepBestOne(options.monitor, options.mode))
    rules.append(KeepProtected())
    return RetentionPolicy(tuple(rules))


def policy_flags(policy: RetentionPolicy) -> dict[str, Any] | None:
    """The flags :func:`build_policy` would turn into ``policy`` (stored in each manifest, so that
    ``ckpt-plugins ls`` can say which rule keeps each checkpoint), or ``None`` when the policy holds
    a rule that no flag makes (a hand-built :class:`RetentionPolicy`).

    Example:
        >>> flags = policy_flags(build_policy(keep_last=2, monitor="loss"))
        >>> flags["keep_last"], flags["monitor"], flags["mode"], flags["keep_best"]
        (2, 'loss', 'min', None)
    """
    flags: dict[str, Any] = {
        "keep_last": None,
        "keep_best": None,
        "monitor": None,
        "mode": "min",
        "keep_every_n_steps": None,
        "keep_time_interval": None,
    }
    for rule in policy.rules:
        if isinstance(rule, KeepLast):
            flags["keep_last"] = rule.n
        elif isinstance(rule, KeepBest):
            flags.update(keep_best=rule.n, monitor=rule.monitor, mode=rule.mode)
        elif isinstance(rule, KeepBestOne):
            flags.update(monitor=rule.monitor, mode=rule.mode)
        elif isinstance(rule, KeepEveryNSteps):
            flags["keep_every_n_steps"] = rule.n
        elif isinstance(rule, KeepTimeInterval):
            flags["keep_time_interval"] = rule.seconds
        elif not isinstance(rule, (KeepAll, KeepLatest, KeepProtected)):
            return None
    return flags
